"""`--data synthetic`: the built-in suite as a DataSource, and one short run on it (aux loss on real targets)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from visor import presets
from visor.backbones import family
from visor.data import build_tokenizer
from visor.training import train
from visor.training.data import resolve_data
from visor.training.recipes import flatten_patch_targets

from training_helpers import fast_settings

pytest.importorskip("visor.data.processor")


@pytest.fixture(scope="module")
def source():
    return resolve_data("synthetic:read_cell,has_shape", presets.tiny(2), seed=0)


def test_batches_are_deterministic_and_aligned(source, stock_factory):
    batch, again = source.train_batch([3, 4]), source.train_batch([3, 4])
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    assert source.tasks == ("read_cell", "has_shape") and source.num_patch_classes > 1
    # Per-patch targets line up with the crops the vision tower encodes, one row of 64 patches per crop.
    stock = stock_factory(num_layers=2)
    targets = flatten_patch_targets(batch["patch_targets"], batch["image_sizes"], stock.config)
    with torch.no_grad():
        hidden = stock.model.vision_tower(batch["pixel_values"].flatten(0, 1)).last_hidden_state
    assert targets.shape[0] <= hidden.shape[0] and targets.shape[1] == hidden.shape[1]
    # Labels cover only the answer and the end of sequence.
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert answer[-1].item() == source.tokenizer.eos_token_id


def test_eval_prompts_and_majority_baseline(source):
    batches = list(source.eval_batches("validation", 3, 4))
    assert sum(len(b.answers) for b in batches) == 6
    assert all(b.inputs["attention_mask"][:, -1].all() for b in batches)  # left padding for generation
    baseline = source.majority_baseline("validation", 20)
    assert set(baseline) == {"read_cell", "has_shape"} and all(0 < v <= 100 for v in baseline.values())


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="has no tasks"):
        resolve_data("synthetic:read_sell", presets.tiny(2), seed=0)


def test_full_recipe_runs_on_the_suite_with_the_aux_loss(tmp_path):
    summary = train("full", "synthetic:read_cell,has_shape", tmp_path, fast_settings(max_steps=2, batch_size=2),
                    model_preset="tiny", progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["aux_loss"] > 0
    assert set(summary["validation"]["accuracy"]["full"]) == {"read_cell", "has_shape", "mean"}
    assert set(summary["validation"]["majority"]) == {"read_cell", "has_shape"}
    # The model folder carries the suite's tokenizer, so `visor generate --model` needs nothing else.
    assert AutoTokenizer.from_pretrained(tmp_path / "model").get_vocab() == build_tokenizer().get_vocab()


def test_a_named_suite_sets_image_size_and_knobs():
    source = resolve_data("synthetic@demo:read_cell,count_marks", presets.tiny(2), seed=0)
    assert source.tasks == ("read_cell", "count_marks") and source.size == (64, 64)
    batch = source.train_batch([0, 1])
    assert batch["image_sizes"].tolist() == [[64, 64], [64, 64]]
    with pytest.raises(ValueError, match="unknown suite"):
        resolve_data("synthetic@nope", presets.tiny(2), seed=0)


def test_easy_vqa_rows_train_without_patch_targets():
    source = resolve_data("synthetic@demo:read_cell,easy_vqa", presets.tiny(2), seed=0)
    batch = source.train_batch([0, 1, 2, 3])  # tasks alternate: read_cell, easy_vqa, ...
    targets = batch["patch_targets"]
    assert (targets[1] == -100).all() and (targets[3] == -100).all()
    assert (targets[0] != -100).any() and (targets[2] != -100).any()


def test_task_weights_set_the_mix_without_repeating_samples():
    source = resolve_data("synthetic@demo:read_cell*3,dominant_color", presets.tiny(2), seed=0)
    assert source.tasks == ("read_cell", "dominant_color")
    samples = [source.schedule[i % len(source.schedule)] for i in range(8)]
    assert [name for name, _, _ in samples].count("read_cell") == 6
    drawn = [(name, (i // 4) * weight + k) for i, (name, k, weight) in enumerate(samples)]
    assert len(set(drawn)) == len(drawn), "no sample is drawn twice"
    for bad in ("synthetic@demo:read_cell*0", "synthetic@demo:read_cell*x", "synthetic@demo:read_cell,read_cell"):
        with pytest.raises(ValueError):
            resolve_data(bad, presets.tiny(2), seed=0)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl3"])
def test_every_recipe_runs_on_the_qwen_vl_and_internvl_backbones_and_the_loss_falls(tmp_path, preset):
    """From scratch (no patch targets on this family: no aux loss), then VISOR's stage 1 and universal training."""
    data = "synthetic@demo:read_cell,dominant_color"

    def losses(folder):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [record["loss"] for record in records if "loss" in record]

    train("full", data, tmp_path / "full", fast_settings(max_steps=12, model_layers=3), model_preset=preset,
          progress=False)
    full = losses(tmp_path / "full")
    assert full[-1] < full[0] / 2
    train("visor-stage1", data, tmp_path / "stage1", fast_settings("visor-stage1", max_steps=2),
          init=tmp_path / "full" / "model", progress=False)
    summary = train("visor-universal", data, tmp_path / "universal", fast_settings("visor-universal", max_steps=3),
                    init=tmp_path / "stage1" / "model", progress=False)
    assert all(loss > 0 for loss in losses(tmp_path / "universal"))
    model = family(presets.PRESETS[preset]()).VISOR_MODEL.from_pretrained(tmp_path / "universal" / "model")
    assert model.config.cross_attention_layers == [0]
    every_configuration = {str(index) for index in range(len(model.config.configurations))}
    assert set(summary["validation"]["accuracy"]) == every_configuration


def test_a_video_suite_gives_each_prompt_its_whole_clip():
    from visor.backbones import backbone_for

    config = presets.tiny(2)
    source = resolve_data("synthetic@video", config, seed=0)
    assert source.tasks == ("which_frame", "count_frames", "what_changed", "dominant_color_video")
    assert source.num_patch_classes == 0 and source.frames == 8
    batch = source.train_batch([0, 1, 2, 3])
    assert tuple(batch["pixel_values_videos"].shape) == (4, 8, 3, 64, 64) and "pixel_values" not in batch
    tokens = backbone_for(config).video_tokens(8).visual_tokens
    assert (batch["input_ids"] == config.video_token_id).sum(dim=1).tolist() == [tokens] * 4
    assert batch["labels"].ne(-100).any(dim=1).all()
    prompts = next(source.eval_batches("validation", 2, 8))
    assert prompts.inputs["pixel_values_videos"].shape[:2] == (8, 8) and "labels" not in prompts.inputs
    with pytest.raises(ValueError, match="InternVL models take no video"):
        resolve_data("synthetic@video", presets.tiny_internvl3(), seed=0)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_a_qwen_vl_video_suite_gives_each_prompt_its_whole_clip_in_temporal_patches(tmp_path, preset):
    """Qwen2.5-VL (Qwen3-VL) reads the clips as its processor prepares them (8 frames: 4 temporal patches of the
    64 x 64 frames' patch grid; Qwen3-VL's each after its timestamp), and trains on them from scratch."""
    from visor.backbones import backbone_for

    config = presets.PRESETS[preset](2)
    source = resolve_data("synthetic@video", config, seed=0)
    batch = source.train_batch([0, 1, 2, 3])
    assert batch["video_grid_thw"].tolist() == [[4, 8, 8]] * 4 and "pixel_values" not in batch
    assert (batch["input_ids"] == config.video_token_id).sum(dim=1).tolist() == [4 * 8 * 8 // 4] * 4
    assert batch["mm_token_type_ids"].eq(2).sum(dim=1).tolist() == [64] * 4
    torch.manual_seed(0)
    with torch.no_grad():  # the stock model raises when the video tokens and features disagree
        assert torch.isfinite(backbone_for(config).stock_model_class(config).eval()(**batch).loss)
    summary = train("full", "synthetic@video:which_frame", tmp_path / "full", fast_settings(max_steps=2),
                    model_preset=preset, progress=False)
    assert set(next(iter(summary["validation"]["accuracy"].values()))) == {"which_frame", "mean"}
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [record["loss"] > 0 for record in records if "loss" in record] == [True, True]


def test_every_recipe_trains_on_the_video_suite(tmp_path):
    """From scratch on clips, then VISOR's stage 1 and universal training; validation scores every configuration
    on the video questions."""
    data = "synthetic@video:which_frame,dominant_color_video"
    train("full", data, tmp_path / "full", fast_settings(max_steps=3), model_preset="tiny", progress=False)
    train("visor-stage1", data, tmp_path / "stage1", fast_settings("visor-stage1", max_steps=2),
          init=tmp_path / "full" / "model", progress=False)
    summary = train("visor-universal", data, tmp_path / "universal", fast_settings("visor-universal", max_steps=2),
                    init=tmp_path / "stage1" / "model", progress=False)
    records = [json.loads(line) for line in (tmp_path / "universal" / "metrics.jsonl").read_text().splitlines()]
    assert all(record["loss"] > 0 for record in records if "loss" in record)
    assert all(set(accuracy) == {"which_frame", "dominant_color_video", "mean"}
               for accuracy in summary["validation"]["accuracy"].values())
