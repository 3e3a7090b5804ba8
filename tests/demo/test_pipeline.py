"""`visor demo --quick` end to end: output structure, interruption (SIGKILL) and resumption, reuse and `--fresh`.

One killed run plus one complete quick run (a few minutes on 2 cores); the numbers are meaningless at this scale
and are not checked, only that every promised piece is there and consistent.
"""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visor import cli
from visor.data.suites import get_suite
from visor.demo.pipeline import CHECKPOINT, DONE, STAGES, DemoPlan

REQUIRED = {"method", "setting", "task", "group", "accuracy", "llm_prefill_flops", "savings"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A quick demo killed with SIGKILL during stage 1, then run again to the end."""
    output = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, VISOR_FAULT_INJECTION="checkpoint:2:30")  # stall inside stage 1's 2nd checkpoint
    process = subprocess.Popen([sys.executable, "-m", "visor.cli", "demo", "--quick", "--output", str(output),
                                "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = output / "stage1" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(checkpoints.glob(".tmp-step-000002-*")):
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = {stage: (output / stage / DONE).exists() for stage in STAGES}
    lines = []
    assert cli.main(["demo", "--quick", "--output", str(output), "--no-progress"]) == 0
    return output, killed, lines


def test_a_killed_run_shows_no_unfinished_stage(demo_run):
    output, killed, _ = demo_run
    assert killed["full"] and not any(killed[stage] for stage in STAGES[1:]), killed


def test_outputs_have_every_row_and_file(demo_run):
    output, _, _ = demo_run
    assert all((output / stage / DONE).exists() for stage in STAGES)
    report = output / "report"
    results = json.loads((report / "results.json").read_text())
    rows = results["rows"]
    assert rows and all(REQUIRED <= set(row) for row in rows)
    tasks = {row["task"] for row in rows}
    assert tasks == set(get_suite("demo").task_names)
    methods = {(row["method"], row["setting"]) for row in rows}
    assert {("full", "all tokens"), ("text-only", "no image"), ("visor-policy", "auto")} <= methods
    assert {m for m, _ in methods} >= {"visor"}
    for key in methods:  # one row per method x setting x task
        assert sorted(row["task"] for row in rows if (row["method"], row["setting"]) == key) == sorted(tasks)
    full = [row for row in rows if row["method"] == "full"]
    assert all(row["savings"] == pytest.approx(1.0) for row in full)
    assert all(row["group"] in ("hard", "easy") for row in rows)
    assert all(0 <= row["accuracy"] <= 100 and row["llm_prefill_flops"] > 0 for row in rows)
    policy = [row for row in rows if row["method"] == "visor-policy"]
    assert all(sum(row["histogram"].values()) == row["samples"] for row in policy)
    markdown = (report / "report.md").read_text()
    for heading in ("## Verdicts", "## Table 1", "## Table 2", "## Table 3", "## Table 4a", "## Table 4b",
                    "## Table 5", "## easy-VQA", "seed"):
        assert heading in markdown
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "policy" / "model" / "tokenizer_config.json").exists()
    config = json.loads((output / "universal" / "model" / "config.json").read_text())
    assert config["cross_attention_key_value_heads"] == 1  # the demo's default
    policy_config = json.loads((output / "policy" / "model" / "config.json").read_text())
    assert policy_config["router_mode"] == "softmax" and policy_config["router_novelty_references"] == 0
    assert "a softmax router" in markdown
    variants = results["stages"]["policy"]["variants"]  # the policy on task knobs it never saw
    assert (output / "policy" / "report-variants" / "policy_report.json").exists()
    assert {row["subset"] for row in variants} == {"all", "group:hard", "group:easy"}
    assert {"router", "oracle", "fixed-0"} <= {row["method"] for row in variants}
    assert "held-out task variants" in markdown
    assert "Router at every τ on the test split, hard tasks" in markdown
    from visor.flops import router_flops
    from visor.policy import LabelTable, router_outcome
    from visor.policy.api import full_model_flops
    from visor.training.recipes import load_checkpoint

    stage = results["stages"]["policy"]  # its validation figures are the router's at the saved τ on the saved labels
    routed = load_checkpoint(output / "policy" / "model")
    table = LabelTable.load(output / "policy" / "labels-validation.safetensors")
    outcome = router_outcome(routed.router, table, stage["threshold"], router_flops(routed.config))
    assert stage["validation_policy_accuracy"] == pytest.approx(outcome.accuracy)
    assert stage["validation_policy_savings"] == pytest.approx(
        float(full_model_flops(routed, table).double().sum() / outcome.flops.double().sum()))
    guarantee = results["stages"]["policy"]["guarantee"]  # certified on validation, against the full model's answers
    assert (guarantee["max_loss"], guarantee["samples"]) == (DemoPlan.quick().max_loss, 8 * len(tasks))
    assert guarantee["reference"] == "the full model" and guarantee["certified"] == (guarantee["threshold"] < 1)
    full_test = [row for row in results["groups"] if row["method"] == "full"]
    for lost in (guarantee["test"], guarantee["variants"]):
        assert 0 <= lost["loss"] <= 1 and lost["loss"] >= lost["accuracy_drop"] / 100 - 1e-9
    samples = sum(row["samples"] for row in full_test)  # the labels' full model answers as the scored one does
    accuracy = sum(row["accuracy"] * row["samples"] for row in full_test) / samples
    assert guarantee["test"]["reference_accuracy"] == pytest.approx(accuracy)
    assert "the guarantee does NOT apply, shown anyway" in markdown
    matched = round(results["stages"]["policy"]["validation_policy_savings"], 1)  # baselines at VISOR's FLOPs too
    expected = {f"{ratio:g}x" for ratio in results["plan"]["ratios"]}
    if min(abs(matched - ratio) for ratio in results["plan"]["ratios"]) >= 0.1:
        expected.add(f"{matched:g}x")
    for method in ("pool", "fastv", "visor+pool"):
        assert {setting for name, setting in methods if name == method} == expected


def test_running_again_reuses_every_stage_with_the_same_numbers(demo_run, capsys):
    output, _, _ = demo_run
    before = json.loads((output / "report" / "results.json").read_text())["rows"]
    (output / "report" / DONE).unlink()  # the report is recomputed from the saved scores
    assert cli.main(["demo", "--quick", "--output", str(output), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{stage}] finished earlier, reused" in printed for stage in STAGES[:-1])
    assert json.loads((output / "report" / "results.json").read_text())["rows"] == before


def test_trained_baselines_add_their_stage_and_rows_to_a_finished_run(demo_run, tmp_path, capsys):
    """`--trained-baselines` on a finished run: every earlier stage reused; the full model fine-tuned, pooled +
    fine-tuned at 2x and 4x, and M3-style, each for stage 1 + universal steps on the same data (no auxiliary loss,
    universal's learning rate); scored, and the report redone with their rows, the others unchanged."""
    from visor.demo.pipeline import M3_STRIDES

    output = tmp_path / "demo"
    shutil.copytree(demo_run[0], output)
    before = json.loads((output / "report" / "results.json").read_text())["rows"]
    assert cli.main(["demo", "--quick", "--output", str(output), "--no-progress", "--trained-baselines"]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{stage}] finished earlier, reused" in printed for stage in STAGES[:-1])
    plan = DemoPlan.quick()
    steps = plan.stage1_steps + plan.universal_steps
    pooled, visor = {}, json.loads((output / "universal" / "settings.json").read_text())
    for name in ("full-fine-tuned", "pool-fine-tuned-2x", "pool-fine-tuned-4x", "m3"):
        settings = json.loads((output / "trained" / name / "settings.json").read_text())
        assert settings["recipe"] == "full" and settings["max_steps"] == steps
        same = ("data", "seed", "batch_size", "learning_rate", "freeze_vision_tower")
        assert {key: settings[key] for key in same} == {key: visor[key] for key in same}
        assert settings["aux_weight"] == 0 and settings["learning_rate"] == 3e-4
        pooled[name] = settings["pool_strides"]
    assert pooled["full-fine-tuned"] is None and pooled["m3"] == list(M3_STRIDES)
    assert 1 < pooled["pool-fine-tuned-2x"][0] < pooled["pool-fine-tuned-4x"][0]
    results = json.loads((output / "report" / "results.json").read_text())
    trained = {(row["method"], row["setting"]) for row in results["rows"]} - {(r["method"], r["setting"]) for r in before}
    assert trained == {("full-fine-tuned", f"{steps} steps"), ("pool-fine-tuned", "2x"), ("pool-fine-tuned", "4x"),
                       *(("m3", f"stride {stride:g}") for stride in M3_STRIDES)}
    assert [row for row in results["rows"] if (row["method"], row["setting"]) not in trained] == before
    savings = {row["setting"]: row["savings"] for row in results["groups"] if row["method"] == "m3"}
    assert savings["stride 1"] == pytest.approx(1.0) and savings["stride 8"] > savings["stride 4"] > savings["stride 2"]
    markdown = (output / "report" / "report.md").read_text()
    assert "## Table 6: trained baselines (equal training budget)" in markdown
    assert "Equal training budget, hard tasks: m3 at stride" in markdown


def test_other_settings_or_foreign_folders_are_refused(demo_run, tmp_path, capsys):
    output, _, _ = demo_run
    assert cli.main(["demo", "--output", str(output), "--no-progress"]) == 2  # full plan on a quick folder
    assert "other settings" in capsys.readouterr().err
    (tmp_path / "precious.txt").write_text("keep me")
    assert cli.main(["demo", "--quick", "--fresh", "--output", str(tmp_path), "--no-progress"]) == 2
    assert (tmp_path / "precious.txt").exists()


def test_the_visor_schedule_suites_and_a_fixed_tower_can_be_chosen(tmp_path):
    """`--cross-attention-layers/--self-attention-layers/--cross-attention-heads` convert with that schedule and
    the stage-1 recipe's CA initialisation; `--suite/--variants` pick what is scored; `--freeze-vision-tower`
    reaches universal training (quick plan, own folder)."""
    output = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output", str(output), "--no-progress", "--cross-attention-heads", "host",
                     "--cross-attention-layers", "0", "--self-attention-layers", "1,3", "--suite", "two-hop",
                     "--variants", "two-hop-variants", "--freeze-vision-tower", "--router-mode", "multilabel",
                     "--novelty-quantile", "0.98"]) == 0
    results = json.loads((output / "report" / "results.json").read_text())
    assert {row["task"] for row in results["rows"]} == set(get_suite("two-hop").task_names)
    assert "key_digit" in (output / "report" / "report.md").read_text()
    assert "`two-hop-variants`" in (output / "report" / "report.md").read_text()
    assert json.loads((output / "universal" / "settings.json").read_text())["freeze_vision_tower"] is True
    config = json.loads((output / "universal" / "model" / "config.json").read_text())
    assert config["cross_attention_layers"] == [0] and config["configurations"] == [[], [1], [1, 3]]
    assert config["cross_attention_key_value_heads"] is None
    assert config["cross_attention_init"] == "host" and config["cross_attention_gate"] is False
    settings = {row["setting"] for row in json.loads((output / "report" / "results.json").read_text())["rows"]
                if row["method"] == "visor"}
    assert settings == {"SA []", "SA [1]", "SA [1, 3]"}
    assert json.loads((output / "plan.json").read_text())["cross_attention_layers"] == [0]
    policy_config = json.loads((output / "policy" / "model" / "config.json").read_text())
    assert policy_config["router_mode"] == "multilabel"  # and the guard, fitted on the router's training labels:
    labelled = DemoPlan.quick().train_labels_per_task * len(get_suite("two-hop").task_names)
    assert policy_config["router_novelty_references"] == labelled
    assert policy_config["router_novelty_threshold"] > 0


def test_a_bad_schedule_is_refused(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output", str(tmp_path / "bad"), "--no-progress",
                     "--cross-attention-layers", "9"]) == 2
    assert "cross_attention_layers [9] out of range" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--training-data", "synthetic@demo-train:read_cell,no_such_task"),
                                           ("--suite", "no_such_suite"), ("--variants", "no_such_suite"),
                                           ("--max-loss", "0"), ("--confidence", "1.5"), ("--max-loss", "0.01")])
def test_bad_data_or_suites_are_refused_before_anything_is_written(tmp_path, capsys, option, value):
    output = tmp_path / "bad"
    assert cli.main(["demo", "--quick", "--output", str(output), "--no-progress", option, value]) == 2
    assert value.split(",")[-1] in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("arguments, message", [
    (["--variants", "demo-variants"], "holds video tasks but its variants 'demo-variants' hold image tasks"),
    (["--trained-baselines"], "run it without --trained-baselines"),
])
def test_a_video_suite_refuses_image_variants_and_the_trained_baselines(tmp_path, capsys, arguments, message):
    output = tmp_path / "bad"
    assert cli.main(["demo", "--quick", "--suite", "video", "--checkpoint", str(CHECKPOINT), "--output", str(output),
                     "--no-progress", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_the_quick_video_demo_sets_visor_beside_the_video_baselines(tmp_path):
    """`--suite video` (from a full model given by --checkpoint: none is shipped for video yet) brings its conversion
    mix and the video variants; every system is scored on clips (text-only drops the video's tokens), the baselines
    are the video reductions, and the report says of each whether the policy beats it at the FLOPs nearest its own."""
    import re

    from visor.demo.pipeline import SUITE_DEFAULTS
    from visor.reduction import VIDEO_METHODS

    output = tmp_path / "video"
    assert cli.main(["demo", "--quick", "--suite", "video", "--checkpoint", str(CHECKPOINT), "--output", str(output),
                     "--no-progress"]) == 0
    plan = json.loads((output / "plan.json").read_text())
    assert plan["variants"] == "video-variants" and plan["training_data"] == SUITE_DEFAULTS["video"]["training_data"]
    results = json.loads((output / "report" / "results.json").read_text())
    assert {row["task"] for row in results["rows"]} == set(get_suite("video").task_names)
    assert {row["method"] for row in results["rows"]} == {"full", "text-only", "visor", "visor-policy",
                                                          *VIDEO_METHODS}
    full = next(row for row in results["groups"] if row["method"] == "full" and row["group"] == "hard")
    text_only = next(row for row in results["groups"] if row["method"] == "text-only" and row["group"] == "hard")
    assert text_only["llm_prefill_flops"] < full["llm_prefill_flops"] / 5  # a clip's tokens are most of a prompt
    report = (output / "report" / "report.md").read_text()
    for method in VIDEO_METHODS:
        assert re.search(rf"\b{re.escape(method)} at \S+ \([\d.]+x, nearest to the policy's", report), method


def test_a_bad_router_mode_is_refused_before_anything_is_written(tmp_path):
    from visor.demo.pipeline import Demo

    output = tmp_path / "bad"
    with pytest.raises(ValueError, match="router mode must be one of"):
        Demo(output, DemoPlan.quick(router_mode="argmax"), progress=False).run()
    assert not output.exists()


def test_the_demo_threshold_falls_back_when_no_tau_gets_close(stock_factory, open_visor_factory):
    """A router sure (probability exactly 1.0) that the cheapest configuration will do, which is wrong on every
    sample: no τ reaches the largest configuration's accuracy, so τ is the most accurate one, not a crash."""
    import torch

    from visor.demo.pipeline import demo_threshold
    from visor.policy import LabelTable

    model = open_visor_factory(stock_factory("tiny", 6))
    count = len(model.config.configurations)
    correct = torch.zeros(8, count, dtype=torch.bool)
    correct[:, model.config.largest_configuration] = True
    table = LabelTable(torch.zeros(8, 2 * model.config.text_config.hidden_size), correct.float(), correct,
                       torch.arange(1, count + 1).repeat(8, 1), torch.zeros(8, 2, dtype=torch.long),
                       ["t"] * 8, ["hard"] * 8)
    router = model.router
    with torch.no_grad():
        for parameter in router.parameters():
            parameter.zero_()
        router.mlp[-1].bias[0] = 100.0  # the cheapest configuration
    threshold, outcome, largest = demo_threshold(model, router, table)
    assert largest == 100.0 and outcome.accuracy == 0.0 and threshold == 0.0


@pytest.mark.parametrize("suite, script", [("demo", "train_demo_checkpoint.sh"),
                                           ("two-hop", "train_two_hop_checkpoint.sh")])
def test_the_conversion_trains_on_the_mix_the_shipped_model_was_trained_on_last(suite, script):
    """Each suite's default conversion data is said to be the last stage's mix of the script that trained its
    shipped full model; keep them equal."""
    import re
    from pathlib import Path

    from visor.demo.pipeline import SUITE_DEFAULTS

    text = (Path(__file__).resolve().parents[2] / "scripts" / script).read_text()
    last_stage_data = re.findall(r"'(synthetic@[^']+)'", text)[-1]
    assert SUITE_DEFAULTS[suite]["training_data"] == last_stage_data


def test_a_suite_without_a_shipped_model_needs_a_checkpoint(tmp_path, capsys):
    output = tmp_path / "standard"
    assert cli.main(["demo", "--quick", "--output", str(output), "--no-progress", "--suite", "standard"]) == 2
    assert "no full model is shipped for suite 'standard'" in capsys.readouterr().err
    assert not output.exists()


def test_rescoring_a_baseline_with_unchanged_code_reproduces_its_rows(demo_run, tmp_path):
    """scripts/rescore_baselines.py scores stock-model baselines of a finished run again in place."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rescore", Path(__file__).parents[2] / "scripts" / "rescore_baselines.py")
    rescore = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rescore)
    output, _, _ = demo_run
    folder = tmp_path / "run"
    shutil.copytree(output / "report", folder)
    before = json.loads((folder / "results.json").read_text())
    after = rescore.rescore(folder, ["visionzip"], ["visor+visionzip"])
    assert after["rows"] == [row for row in before["rows"] if row["method"] != "visor+visionzip"]
    assert after["stages"]["rescored"]["methods"] == ["visionzip"]
    assert "rows of visionzip were scored again" in (folder / "report.md").read_text()
    tampered = json.loads((folder / "results.json").read_text())
    next(row for row in tampered["rows"] if row["method"] == "full")["accuracy"] += 1
    (folder / "results.json").write_text(json.dumps(tampered))
    with pytest.raises(SystemExit, match="full model's rows differ"):
        rescore.rescore(folder, ["hired"], [])
    older = tmp_path / "older"  # a run from before DART existed: its rows are added, as the demo makes them
    shutil.copytree(output / "report", older)
    without = {part: [row for row in before[part] if row["method"] != "dart"] for part in ("rows", "groups")}
    (older / "results.json").write_text(json.dumps(dict(before, **without)))
    added = rescore.rescore(older, ["dart"], [])
    assert added["rows"] == before["rows"] and added["groups"] == before["groups"]
    assert [record["methods"] for record in added["stages"]["added"]] == [["dart"]]
    assert "rescored" not in added["stages"] and "rows of dart were added later" in (older / "report.md").read_text()


def test_the_quick_demo_runs_on_a_qwen_vl_model(tmp_path, capsys):
    """A tiny Qwen2.5-VL full model (a few steps from scratch) through every stage: VISOR's rows, the policy and
    the in-LLM baselines (the pre-LLM ones are LLaVA-OV's), on M-RoPE positions end to end."""
    from visor.training import TrainingSettings, train

    settings = TrainingSettings(max_steps=4, batch_size=4, mixed_precision="no", eval_every=0, samples_per_task=2,
                                warmup_steps=1, num_threads=1, model_layers=6)
    train("full", "synthetic@demo:read_cell,dominant_color", tmp_path / "full", settings,
          model_preset="tiny-qwen2.5-vl", progress=False)
    output = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--checkpoint", str(tmp_path / "full" / "model"), "--output", str(output),
                     "--no-progress"]) == 0
    results = json.loads((output / "report" / "results.json").read_text())
    methods = {row["method"] for row in results["rows"]}
    assert methods == {"full", "text-only", "visor", "visor-policy", "fastv", "random", "dart", "pyramiddrop",
                       "sparsevlm", "shortv"}
    assert json.loads((output / "universal" / "model" / "config.json").read_text())["model_type"] == "visor_qwen2_5_vl"
    visor_rows = [row for row in results["rows"] if row["method"] == "visor"]
    assert len({row["setting"] for row in visor_rows}) == 3 and all(row["savings"] > 1 for row in visor_rows)
    # The demo's policy model answers through `visor generate` as a LLaVA-OV one does.
    from PIL import Image

    Image.new("RGB", (64, 96), (200, 30, 30)).save(tmp_path / "red.png")
    assert cli.main(["generate", "--model", str(output / "policy" / "model"), "--image", str(tmp_path / "red.png"),
                     "--question", "what color is the shape ?", "--max-new-tokens", "2"]) == 0
    assert "24 visual + " in capsys.readouterr().out  # a 64×96 image: a 4×6 grid of merged patches
