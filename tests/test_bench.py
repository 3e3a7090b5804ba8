"""`visor bench` end to end on the tiny preset: rows, FLOPs from the counter, the KV-cache split, plots, bad input,
and the video bench (one video of N frames per prompt)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaOnevisionForConditionalGeneration

from visor import bench, cli, presets, reduction
from visor.backbones import backbone_for
from visor.config import Schedule
from visor.reduction.budget import counted_video_pixels
from visor.reduction.pruned import PruningPlan
from visor.flops import llm_prefill_flops, prompt_prefill_flops, video_vision_flops

REQUIRED_KEYS = {
    "method", "configuration", "visual_tokens", "text_tokens", "llm_prefill_flops",
    "prefill_s", "decode_s_per_token", "kv_bytes_visual", "kv_bytes_text",
}
VISUAL_TOKENS = (8, 24)
TEXT_TOKENS = 5


def run_cli(*argv: str):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    return cli.run_command(parser.parse_args(["bench", *argv]))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    tokens = ",".join(map(str, VISUAL_TOKENS))
    assert run_cli("--preset", "tiny", "--visual-tokens", tokens, "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "1", "--output", str(output)) == 0
    return output, json.loads((output / "bench.json").read_text())


def test_one_row_per_method_configuration_and_visual_tokens(result):
    _, rows = result
    config = bench.BenchPlan("tiny").config
    configurations = range(len(config.configurations))
    expected = {("full", None), ("text-only", None)} | {("visor", index) for index in configurations}
    for visual in VISUAL_TOKENS:
        sweep = [row for row in rows if row["visual_tokens"] == visual]
        assert {(row["method"], row["configuration"]) for row in sweep} == expected
        assert len(sweep) == len(expected)
    for row in rows:
        assert REQUIRED_KEYS <= set(row)
        assert row["text_tokens"] == TEXT_TOKENS
        assert row["prefill_s"] > 0 and row["decode_s_per_token"] > 0
        schedule = {"visor": lambda: Schedule.of(config, row["configuration"]), "full": lambda: Schedule.full(config),
                    "text-only": Schedule.text_only}[row["method"]]()
        counted = llm_prefill_flops(config, row["visual_tokens"], TEXT_TOKENS, schedule, logits_tokens=1)
        assert row["llm_prefill_flops"] == counted.total


def test_kv_bytes_hold_vision_only_where_it_is_read(result):
    """bf16 keys and values: visual ones in every layer (full), in CA + used SA layers (VISOR), nowhere (text-only)."""
    _, rows = result
    config = bench.BenchPlan("tiny").config
    text_config = config.text_config
    per_token_layer = 2 * text_config.num_key_value_heads * (text_config.hidden_size // text_config.num_attention_heads) * 2
    for row in rows:
        assert row["kv_bytes_text"] == config.num_layers * TEXT_TOKENS * per_token_layer
        if row["method"] == "full":
            layers = config.num_layers
        elif row["method"] == "visor":
            layers = len(config.cross_attention_layers) + len(config.configurations[row["configuration"]])
        else:
            layers = 0
        assert row["kv_bytes_visual"] == layers * row["visual_tokens"] * per_token_layer


def test_ratios_are_relative_to_the_full_model(result):
    _, rows = result
    for row in rows:
        full = next(other for other in rows if other["method"] == "full" and other["visual_tokens"] == row["visual_tokens"])
        assert row["flops_ratio"] == pytest.approx(full["llm_prefill_flops"] / row["llm_prefill_flops"])
        assert row["speedup"] == pytest.approx(full["prefill_s"] / row["prefill_s"])
        if row["method"] != "full":
            assert row["flops_ratio"] > 1


def test_image_rows_keep_their_fields_and_table(result):
    """An image run's bench.json and table are what they were before video: no `video_frames`, no frames column."""
    _, rows = result
    assert all(set(row) == set(rows[0]) and "video_frames" not in row for row in rows)
    assert bench._table([bench.BenchRow(**row) for row in rows]).split("\n")[0].split()[:3] == ["method", "Nv", "GFLOPs"]


def test_plots_are_valid_images(result):
    output, _ = result
    for name in ("flops.png", "speedup.png"):
        with Image.open(output / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(preset="llava-ov-7b"), "unknown preset 'llava-ov-7b'; choose one of .*tiny"),
        (dict(visual_tokens=(729, 0)), "visual tokens must be positive"),
        (dict(visual_tokens=()), "visual tokens must be positive"),
        (dict(configurations=(0, 9)), r"configurations \[9\] do not exist"),
        (dict(text_tokens=0), "text_tokens must be at least 1"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(cross_attention_key_value_heads=3), "cross_attention_key_value_heads must be a positive divisor"),
        (dict(batch_sizes=(8, 0)), r"batch sizes must be at least 1, got \[8, 0\]"),
        (dict(batched_prefill=True), "batched prefill needs batch sizes"),
        (dict(kv_budget_gib=1e-6, visual_tokens=(729,)), "a KV budget of 1e-06 GiB holds no request: VISOR configuration 0"),
        (dict(kv_budget_gib=-1.0), "holds no request"),
        # The tiny LLaVA-OV model's anyres images run 2, 3 or 5 crops of 64 tokens: 24 tokens would be one crop.
        (dict(visual_tokens=(128, 24), end_to_end=True), "no image runs exactly 1 crops"),
        (dict(video_frames=(8, 0)), r"video frames must be positive counts, got \[8, 0\]"),
        (dict(video_frames=(2,), visual_tokens=(64,)), "one image of --visual-tokens or one video of --video-frames"),
        (dict(video_frames=(10**7,)), r"at 10000000 frames \(160000001 visual tokens\).* ask for fewer frames"),
        (dict(preset="tiny-qwen2-vl", video_frames=(2,)), "Qwen2VL takes no video"),
        (dict(preset="tiny-internvl3", video_frames=(2,)), "InternVL takes no video"),
        (dict(preset="tiny-qwen3-vl", video_frames=(1,)), "a Qwen3VL video needs at least 2 frames"),
        # Qwen3-VL writes a timestamp between two temporal patches: the prompt's text, one token each here.
        (dict(preset="tiny-qwen3-vl", video_frames=(8,), text_tokens=3), "takes 3 of the prompt's text tokens"),
        (dict(preset="tiny-qwen2.5-vl", video_frames=(2,), baselines=(2.0,)),
         "video reductions .* are not ported to Qwen2_5_VL models"),
        # Qwen2.5-VL puts two frames in each temporal patch: 3 and 4 frames are the same video's tokens.
        (dict(preset="tiny-qwen2.5-vl", video_frames=(2, 3, 4)), r"videos of \[3, 4\] frames have the same 4608 "),
    ],
)
def test_bad_input_is_refused_before_any_model_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        bench.BenchPlan(**{"preset": "tiny", **options})


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert run_cli("--preset", "tiny", "--visual-tokens", "-5", "--output", str(tmp_path)) == 2
    assert "bench: error: visual tokens must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--preset", "tiny", "--visual-tokens", "a,b", "--output", str(tmp_path))
    assert "expected comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_fewer_cross_attention_heads_cut_flops_and_the_visual_cache(result, tmp_path):
    """One K/V head per CA block (the tiny preset's host layers have two): same rows, cheaper CA-only."""
    assert run_cli("--preset", "tiny", "--visual-tokens", str(VISUAL_TOKENS[-1]), "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "1", "--configurations", "0", "--cross-attention-heads", "1",
                   "--output", str(tmp_path)) == 0
    one_head = {row["method"]: row for row in json.loads((tmp_path / "bench.json").read_text())}
    host = {row["method"]: row for row in result[1]
            if row["visual_tokens"] == VISUAL_TOKENS[-1] and row["configuration"] in (None, 0)}
    assert one_head["full"]["llm_prefill_flops"] == host["full"]["llm_prefill_flops"]
    assert one_head["visor"]["llm_prefill_flops"] < host["visor"]["llm_prefill_flops"]
    assert one_head["visor"]["kv_bytes_visual"] == host["visor"]["kv_bytes_visual"] // 2
    assert one_head["visor"]["kv_bytes_text"] == host["visor"]["kv_bytes_text"]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench-baselines")
    assert run_cli("--preset", "tiny", "--visual-tokens", "96", "--text-tokens", str(TEXT_TOKENS), "--repeats", "1",
                   "--decode-tokens", "1", "--configurations", "0", "--baselines", "2", "--output", str(output)) == 0
    return json.loads((output / "bench.json").read_text())


def test_baseline_rows_at_the_requested_ratio(baselines):
    from visor import reduction

    rows = {row["method"]: row for row in baselines}
    assert set(reduction.METHODS) <= set(rows) and {"full", "text-only", "visor"} <= set(rows)
    for method in reduction.METHODS:
        row = rows[method]
        assert row["setting"] == "2x" and row["prefill_s"] > 0 and row["decode_s_per_token"] > 0
        assert row["flops_ratio"] >= 2
        config = bench.BenchPlan("tiny").config
        if row["llm_visual_tokens"] is not None:  # before the LLM: fewer tokens (VISOR alone may already save 2x)
            assert not isinstance(reduction.reduction_at(config, method, 1.0), PruningPlan)
            on_visor = method.startswith("visor+")
            counted = llm_prefill_flops(config, row["llm_visual_tokens"], TEXT_TOKENS, Schedule.of(
                config, config.largest_configuration) if on_visor else Schedule.full(config), logits_tokens=1)
            assert row["llm_prefill_flops"] == counted.total
            assert row["llm_visual_tokens"] <= 96 if on_visor else row["llm_visual_tokens"] < 96
    in_llm = {method for method in reduction.METHODS if rows[method]["llm_visual_tokens"] is None}
    assert in_llm == {"fastv", "random", "dart", "pyramiddrop", "sparsevlm", "shortv"}
    for method in ("fastv", "random", "dart"):
        assert rows[method]["kv_bytes_visual"] < rows["full"]["kv_bytes_visual"]
    assert rows["shortv"]["kv_bytes_visual"] == rows["full"]["kv_bytes_visual"]  # frozen, not dropped


def test_bad_baseline_ratio_is_refused():
    with pytest.raises(ValueError, match="baseline FLOPs ratios must be >= 1"):
        bench.BenchPlan("tiny", baselines=(0.5,))


def test_a_qwen_vl_preset_benches_its_own_family(tmp_path):
    """VISOR's rows and the in-LLM baselines (the pre-LLM ones are LLaVA-OV's) on M-RoPE positions of a 4×6 grid."""
    from visor import reduction
    from visor.flops import nominal_vision_flops

    assert run_cli("--preset", "tiny-qwen3-vl", "--visual-tokens", "24", "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "1", "--baselines", "2", "--output", str(tmp_path)) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    config = bench.BenchPlan("tiny-qwen3-vl").config
    assert config.model_type == "visor_qwen3_vl"
    assert reduction.methods_for(config) == ("fastv", "random", "dart", "pyramiddrop", "sparsevlm", "shortv")
    assert sorted((row["method"], row["configuration"]) for row in rows if row["setting"] is None) == sorted(
        [("full", None), ("text-only", None)] + [("visor", index) for index in range(len(config.configurations))])
    assert {row["method"] for row in rows if row["setting"] == "2x"} == set(reduction.methods_for(config))
    per_token_layer = 2 * config.text_config.num_key_value_heads * config.text_config.head_dim * 2  # bf16 K and V
    for row in rows:
        assert row["vision_flops"] == nominal_vision_flops(config, 24).total
        if row["method"] == "visor":
            layers = len(config.cross_attention_layers) + len(config.configurations[row["configuration"]])
            assert row["kv_bytes_visual"] == layers * 24 * per_token_layer
            schedule = Schedule.of(config, row["configuration"])
            assert row["llm_prefill_flops"] == llm_prefill_flops(config, 24, TEXT_TOKENS, schedule).total


# ---- batched decoding ------------------------------------------------------------------------------------------------
BATCH_SIZES = (1, 3)
KV_BUDGET_GIB = 0.001


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench-batched")
    assert run_cli("--preset", "tiny", "--visual-tokens", str(VISUAL_TOKENS[-1]), "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "2", "--configurations", "0,2", "--baselines", "2",
                   "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--kv-budget", str(KV_BUDGET_GIB),
                   "--output", str(output)) == 0
    return output, json.loads((output / "bench.json").read_text())


def test_every_row_decodes_at_every_batch_size(batched):
    """B copies of the prompt hold B prompts' cache; tokens/s, bytes read and ratios follow from what was timed."""
    output, rows = batched
    plan = bench.BenchPlan("tiny")  # the bench's shapes and dtype
    full_weights = bench.decode_weight_bytes(bench.build_model(plan.dense_config, plan))
    visor_weights = bench.decode_weight_bytes(bench.build_model(plan.config, plan))
    assert full_weights < visor_weights  # the CA blocks are read too
    full = next(row for row in rows if row["method"] == "full")
    for row in rows:
        assert [batch["batch_size"] for batch in row["batched"]] == list(BATCH_SIZES)
        on_visor = row["method"] == "visor" or row["method"].startswith("visor+")
        prompt_bytes = row["kv_bytes_visual"] + row["kv_bytes_text"]
        for batch, full_batch in zip(row["batched"], full["batched"]):
            size = batch["batch_size"]
            assert batch["prefill_s"] is None and batch["decode_s_per_step"] > 0
            assert batch["kv_bytes"] == size * prompt_bytes
            assert batch["decode_tokens_per_s"] == pytest.approx(size / batch["decode_s_per_step"])
            weights = batch["bytes_read_per_step"] - batch["kv_bytes"]
            assert weights == (visor_weights if on_visor else full_weights)
            assert batch["decode_speedup"] == pytest.approx(full_batch["decode_s_per_step"] / batch["decode_s_per_step"])
            assert batch["bytes_read_ratio"] == pytest.approx(full_batch["bytes_read_per_step"] / batch["bytes_read_per_step"])
            assert batch["peak_memory_bytes"] > weights  # the process holds at least the weights (Linux: /proc)
        assert row["requests_in_budget"] == int(KV_BUDGET_GIB * 2**30 // prompt_bytes)
    ca_only = next(row for row in rows if row["method"] == "visor" and row["configuration"] == 0)
    assert ca_only["requests_in_budget"] > full["requests_in_budget"]
    with Image.open(output / "decode.png") as image:
        image.verify()
        assert image.format == "PNG"


@pytest.mark.parametrize("method", ["full", "visor", "fastv"])
def test_a_repeated_cache_decodes_as_a_batched_prefill_of_identical_prompts(method):
    """What the bench times without --batched-prefill is what B prompts prefilled together would decode."""
    import torch

    from visor import reduction

    plan = bench.BenchPlan("tiny", dtype="float32")
    config = plan.dense_config if method != "visor" else plan.config
    model = bench.build_model(config, plan)
    if method == "fastv":
        model = reduction.pruned(model, reduction.reduction_at(plan.config, "fastv", 0.5))
    input_ids, text_ids, images = bench._prompt(model, plan, 24, seed=0)
    inputs = dict(input_ids=input_ids, **images, use_cache=True, logits_to_keep=1)
    if method == "visor":
        inputs["configuration"] = 1
    step = dict(input_ids=text_ids[:1].expand(3, 1), use_cache=True)
    with torch.inference_mode():
        repeated = model(**inputs).past_key_values
        repeated.reorder_cache(torch.zeros(3, dtype=torch.long))
        batched = model(**bench._repeated(inputs, 3)).past_key_values
        assert repeated.nbytes() == batched.nbytes()
        for _ in range(2):
            expected = model(**step, past_key_values=batched).logits
            torch.testing.assert_close(model(**step, past_key_values=repeated).logits, expected)


def test_batched_prefill_is_timed_on_request(tmp_path):
    assert run_cli("--preset", "tiny-qwen3-vl", "--visual-tokens", "24", "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "1", "--configurations", "0", "--batch-sizes", "2",
                   "--batched-prefill", "--output", str(tmp_path)) == 0
    for row in json.loads((tmp_path / "bench.json").read_text()):
        (batch,) = row["batched"]
        assert batch["prefill_s"] > 0 and batch["kv_bytes"] == 2 * (row["kv_bytes_visual"] + row["kv_bytes_text"])


def test_cli_refuses_batch_size_zero(tmp_path, capsys):
    assert run_cli("--preset", "tiny", "--batch-sizes", "0", "--output", str(tmp_path)) == 2
    assert "bench: error: batch sizes must be at least 1" in capsys.readouterr().err


# ---- end to end: the vision tower too --------------------------------------------------------------------------------
def test_end_to_end_adds_the_vision_tower_to_time_to_first_token(tmp_path):
    """Timed once per visual-token count (the same image for every method); the floor has no image."""
    assert run_cli("--preset", "tiny", "--visual-tokens", "128,320", "--text-tokens", str(TEXT_TOKENS), "--repeats",
                   "1", "--decode-tokens", "1", "--configurations", "0", "--baselines", "2", "--end-to-end",
                   "--output", str(tmp_path)) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    for visual in (128, 320):
        sweep = [row for row in rows if row["visual_tokens"] == visual]
        full = next(row for row in sweep if row["method"] == "full")
        assert len({row["vision_s"] for row in sweep if row["method"] != "text-only"}) == 1 and full["vision_s"] > 0
        for row in sweep:
            if row["method"] == "text-only":
                assert row["vision_s"] is None and row["time_to_first_token_s"] is None
                continue
            assert row["time_to_first_token_s"] == pytest.approx(row["vision_s"] + row["prefill_s"])
            assert row["time_to_first_token_speedup"] == pytest.approx(
                full["time_to_first_token_s"] / row["time_to_first_token_s"])
    with Image.open(tmp_path / "time-to-first-token.png") as image:
        image.verify()
        assert image.format == "PNG"


def test_end_to_end_takes_any_token_count_on_qwen_vl():
    """A Qwen-VL image of N tokens is a grid (`nominal_grid`), for any N; LLaVA-OV's refusal is in the bad-input test."""
    bench.BenchPlan("tiny-qwen3-vl", visual_tokens=(13, 24), end_to_end=True)


# ---- video: one video of N frames per prompt -------------------------------------------------------------------------
FRAMES = (1, 3)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench-video")
    assert run_cli("--preset", "tiny", "--video-frames", ",".join(map(str, FRAMES)), "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "1", "--configurations", "0,2", "--batch-sizes", "2",
                   "--end-to-end", "--output", str(output)) == 0
    return output, json.loads((output / "bench.json").read_text())


def test_a_video_prompt_holds_the_stock_model_s_tokens_for_its_frames(video):
    """Each row's visual tokens are the stock video path's for its frames (each frame's patch grid pooled, one
    newline), its vision FLOPs the counter's for those frames, and every method's rows are there."""
    _, rows = video
    config = bench.BenchPlan("tiny").config
    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(2)).eval()
    expected = {("full", None), ("text-only", None), ("visor", 0), ("visor", 2)}
    for frames in FRAMES:
        pixels = torch.randn(1, frames, 3, presets.TINY_CROP, presets.TINY_CROP)
        with torch.no_grad():
            tokens = stock.model.get_video_features(pixels, return_dict=True).pooler_output.shape[1]
        sweep = [row for row in rows if row["video_frames"] == frames]
        assert {(row["method"], row["configuration"]) for row in sweep} == expected and len(sweep) == len(expected)
        assert {row["visual_tokens"] for row in sweep} == {tokens}
        assert {row["vision_flops"] for row in sweep} == {video_vision_flops(config, frames).total}


def test_video_rows_count_flops_and_cache_as_the_counter_does(video):
    _, rows = video
    config = bench.BenchPlan("tiny").config
    per_token_layer = 2 * config.text_config.num_key_value_heads * (
        config.text_config.hidden_size // config.text_config.num_attention_heads) * 2  # bf16 K and V
    for row in rows:
        schedule = {"visor": lambda: Schedule.of(config, row["configuration"]), "full": lambda: Schedule.full(config),
                    "text-only": Schedule.text_only}[row["method"]]()
        counted = llm_prefill_flops(config, row["visual_tokens"], TEXT_TOKENS, schedule, logits_tokens=1)
        assert row["llm_prefill_flops"] == counted.total
        layers = len(schedule.self_attention) + len(schedule.cross_attention) if schedule.visual else 0
        assert row["kv_bytes_visual"] == layers * row["visual_tokens"] * per_token_layer
        assert [batch["batch_size"] for batch in row["batched"]] == [2]
        if row["method"] == "text-only":
            assert row["vision_s"] is None
        else:
            assert row["vision_s"] > 0 and row["time_to_first_token_s"] == pytest.approx(row["vision_s"] + row["prefill_s"])


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_a_qwen_vl_video_bench_holds_the_stock_video_path_s_tokens(tmp_path, preset):
    """Qwen2.5-VL's and Qwen3-VL's nominal videos (2 frames: one temporal patch; 4: two): each row's tokens are
    what the stock video path makes of the video `--end-to-end` times, its vision FLOPs the counter's."""
    assert run_cli("--preset", preset, "--video-frames", "2,4", "--text-tokens", str(TEXT_TOKENS),
                   "--repeats", "1", "--decode-tokens", "1", "--configurations", "0", "--end-to-end",
                   "--output", str(tmp_path)) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    config = bench.BenchPlan(preset).config
    backbone = backbone_for(config)
    stock = backbone.stock_model_class(presets.PRESETS[preset](2)).eval()
    for frames in (2, 4):
        with torch.no_grad():
            (features,) = backbone.encode_videos(stock, 0, **backbone.nominal_video_pixel_inputs(frames))
        sweep = [row for row in rows if row["video_frames"] == frames]
        assert {(row["method"], row["configuration"]) for row in sweep} == {("full", None), ("text-only", None),
                                                                            ("visor", 0)}
        assert {row["visual_tokens"] for row in sweep} == {features.shape[-2]}
        assert {row["vision_flops"] for row in sweep} == {video_vision_flops(config, frames).total}
        assert all(row["vision_s"] > 0 for row in sweep if row["method"] != "text-only")


@pytest.mark.parametrize("dense", [True, False], ids=["full", "visor"])
@pytest.mark.parametrize(("preset", "frames"), [("tiny", 3), ("tiny-qwen2.5-vl", 2), ("tiny-qwen3-vl", 4)])
def test_the_bench_s_video_prompt_runs_the_flops_its_rows_count(dense, preset, frames):
    """FlopCounterMode (eager attention) on the model the bench times, with the bench's own video prompt: exactly
    the counter's LLM prefill FLOPs for its video tokens, which `prompt_prefill_flops` reads off the prompt too
    (Qwen2.5-VL's video features come with the grid and seconds its temporal positions need; Qwen3-VL's temporal
    patches are runs of their own, a text token between two)."""
    plan = bench.BenchPlan(preset, video_frames=(frames,), text_tokens=TEXT_TOKENS, dtype="float32")
    model = bench.build_model(plan.dense_config if dense else plan.config, plan)
    model.set_attn_implementation("eager")
    (visual,) = plan.visual_tokens
    input_ids, _, videos = bench._prompt(model, plan, visual, seed=visual)
    expected = {"video_features", *backbone_for(plan.config).nominal_video_inputs(frames)}
    assert int((input_ids == plan.config.video_token_id).sum()) == visual and set(videos) == expected
    assert input_ids.shape[1] == visual + TEXT_TOKENS
    for index in [None] if dense else range(len(plan.config.configurations)):
        schedule = Schedule.full(plan.config) if dense else Schedule.of(plan.config, index)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(input_ids=input_ids, **videos, configuration=index, logits_to_keep=1)
        analytic = llm_prefill_flops(plan.config, visual, TEXT_TOKENS, schedule, logits_tokens=1).total
        assert counter.get_total_flops() == analytic
        assert prompt_prefill_flops(plan.config, dict(input_ids=input_ids), schedule).tolist() == [analytic]


@pytest.fixture(scope="module")
def video_baselines(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench-video-baselines")
    assert run_cli("--preset", "tiny", "--video-frames", "4", "--text-tokens", str(TEXT_TOKENS), "--repeats", "1",
                   "--decode-tokens", "1", "--configurations", "0", "--baselines", "2", "--end-to-end",
                   "--output", str(output)) == 0
    return json.loads((output / "bench.json").read_text())


def test_video_baselines_are_the_video_reductions_at_the_ratio_on_their_own_vision_path(video_baselines):
    """In a video plan the baselines are the video reductions (none of the image ones), each matched to the ratio on
    this prompt; its LLM row counts the tokens its reducer keeps, its vision FLOPs are the reducer's (frame
    subsampling: fewer frames through the tower), and its time to first token adds its own vision time."""
    config = bench.BenchPlan("tiny").config
    rows = {row["method"]: row for row in video_baselines if row["setting"] is not None}
    assert set(rows) == set(reduction.VIDEO_METHODS)
    full = next(row for row in video_baselines if row["method"] == "full")
    for method, row in rows.items():
        counted = dict(input_ids=torch.tensor([[presets.TINY_VIDEO_TOKEN_ID] * full["visual_tokens"] + [5] * TEXT_TOKENS]),
                       pixel_values_videos=counted_video_pixels(config, 4))
        reducer = reduction.reduction_for(config, method, 2.0, inputs=counted)
        schedule = Schedule.of(config, config.largest_configuration) if method.startswith("visor+") else Schedule.full(config)
        assert row["video_frames"] == 4 and row["visual_tokens"] == full["visual_tokens"]
        assert row["llm_visual_tokens"] == reducer.kept_tokens(config, 4)
        assert method.startswith("visor+") or row["llm_visual_tokens"] < full["visual_tokens"]
        assert row["llm_prefill_flops"] == llm_prefill_flops(config, row["llm_visual_tokens"], TEXT_TOKENS, schedule,
                                                             logits_tokens=1).total
        assert row["vision_flops"] == reducer.vision_flops(config, 4)
        assert row["time_to_first_token_s"] == pytest.approx(row["vision_s"] + row["prefill_s"])
    assert rows["frames"]["vision_flops"] < full["vision_flops"] <= rows["evs"]["vision_flops"]


def test_video_outputs_are_labelled_with_frames(video):
    output, rows = video
    table = bench._table([bench.BenchRow(**{**row, "batched": []}) for row in rows]).split("\n")
    assert table[0].split()[:3] == ["method", "frames", "Nv"]
    for line, row in zip(table[1:], rows):
        assert line.split()[-9:-7] == [str(row["video_frames"]), str(row["visual_tokens"])]
    for name in ("flops.png", "speedup.png", "decode.png", "time-to-first-token.png"):
        with Image.open(output / name) as image:
            image.verify()
            assert image.format == "PNG"
