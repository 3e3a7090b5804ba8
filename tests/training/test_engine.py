"""The run, engineered: hard kills and resume, checkpoints killed mid-write, DDP, logs — through the CLI."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from visor import presets
from visor.training import checkpoint as ckpt
from visor.training import train

from training_helpers import TOY, fast_settings, model_weights, run, set_flags, subprocess_env, train_command

STEPS, SAVE_EVERY = 8, 3
CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"


def _command(output: Path, *extra: str) -> list[str]:
    return train_command("--recipe", "full", "--data", TOY, "--model", "tiny", "--output", str(output),
                         "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--seed", "7",
                         *set_flags(), *extra)


def _losses(output: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def _kill_when(process: subprocess.Popen, ready, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"run ended before it could be killed:\n{process.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    reference, weights = model_weights(reference_dir), model_weights(run_dir)
    assert weights.keys() == reference.keys()
    worst = max((weights[name] - reference[name]).abs().max().item() for name in reference)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run: the trajectory every interrupted run must reproduce."""
    output = tmp_path_factory.mktemp("reference")
    run(_command(output))
    return output


def test_uninterrupted_run_writes_its_outputs(reference):
    assert sorted(_losses(reference)) == list(range(1, STEPS + 1))
    assert [step for step, _ in ckpt.complete_checkpoints(reference)] == [STEPS]  # keep_checkpoints=1
    summary = json.loads((reference / "training_summary.json").read_text())
    assert summary["steps"] == STEPS and set(summary["validation"]["accuracy"]["full"]) == {"colour", "where", "mean"}
    assert json.loads((reference / "validation.json").read_text())[-1]["final"] is True
    state = ckpt.load_training_state(ckpt.latest_checkpoint(reference))
    assert state["step"] == STEPS and state["aux_head"]  # from scratch + per-patch targets: the aux head trains


def test_sigkill_mid_training_then_resume_reproduces_the_run(tmp_path, reference):
    output = tmp_path / "run"
    process = subprocess.Popen(_command(output), env=subprocess_env(VISOR_FAULT_INJECTION="step:0.4"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill after the step-3 checkpoint, while step 5 or later is training.
    _kill_when(process, lambda: ckpt.latest_checkpoint(output) is not None and max(_losses(output), default=0) >= 4)
    assert ckpt.latest_checkpoint(output).name == "step-000003"
    assert not (output / "model").exists()
    run(_command(output, "--resume"))
    _assert_same_weights(output, reference)
    resumed, expected = _losses(output), _losses(reference)
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, STEPS + 1))  # no duplicates from the killed run
    assert sorted(resumed) == sorted(expected)
    assert all(abs(resumed[step] - expected[step]) <= 1e-6 for step in expected)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    output = tmp_path / "run"
    process = subprocess.Popen(_command(output), env=subprocess_env(VISOR_FAULT_INJECTION="checkpoint:6:120"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = ckpt.checkpoint_root(output)
    _kill_when(process, lambda: any((path / ckpt.STATE_FILE).exists() for path in root.glob(".tmp-step-000006-*")))
    assert ckpt.latest_checkpoint(output).name == "step-000003"  # step 6 was never completed
    assert list(root.glob(".tmp-step-000006-*"))
    run(_command(output, "--resume"))
    assert not list(root.glob(".tmp-*"))
    _assert_same_weights(output, reference)


def test_a_folder_holds_one_run_even_from_before_its_data_was_recorded(tmp_path, reference, capsys):
    """A folder whose settings.json predates the data and starting point being recorded is checked on what it
    holds; settings that only decide when to log, evaluate or save may change on resume."""
    from visor.training.cli import main

    output = tmp_path / "run"
    shutil.copytree(reference, output)
    recorded = json.loads((output / "settings.json").read_text())
    (output / "settings.json").write_text(json.dumps(
        {key: value for key, value in recorded.items() if key not in ("data", "init", "model_preset")}))
    in_process = _command(output, "--resume")[3:]  # without `python -m visor.training`
    assert main([*in_process, "--set", "batch_size=8"]) == 2  # the run used 4
    assert "cannot resume" in capsys.readouterr().err and "data" not in json.loads((output / "settings.json").read_text())
    assert main([*in_process, "--save-every", "2", "--set", "log_every=1"]) == 0
    rewritten = json.loads((output / "settings.json").read_text())
    assert rewritten["batch_size"] == 4 and rewritten["data"] == TOY and rewritten["log_every"] == 1
    assert main(_command(output)[3:]) == 2  # a fresh run into it
    assert "already holds a training run" in capsys.readouterr().err


def test_a_second_run_into_a_running_folder_is_refused(tmp_path, reference, capsys):
    """Two runs into one --output: the second (here resuming; a fresh one is refused the same way, see
    tests/test_bad_input.py) is refused naming the first's pid, and the first run's files are its own."""
    from visor.training.cli import main

    output = tmp_path / "run"
    first = subprocess.Popen(_command(output), env=subprocess_env(VISOR_FAULT_INJECTION="step:0.4"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not (output / "metrics.jsonl").is_file():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    assert main(_command(output, "--resume")[3:]) == 2
    assert f"another run (pid {first.pid}) holds its lock" in capsys.readouterr().err
    assert first.wait(timeout=90) == 0, first.stderr.read()[-2000:]
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, STEPS + 1))
    _assert_same_weights(output, reference)
    assert not (output / ".lock").exists()  # released at the end


def test_the_final_weights_are_saved_before_the_final_validation(tmp_path, toy_path):
    """A final validation that fails (a corrupt held-out image, say) loses no training: the last checkpoint and
    the model are written first, and resuming runs the validation alone."""
    import toy_data

    def corrupt(*args, **kwargs):
        raise ValueError("a corrupt held-out image")

    settings = fast_settings(max_steps=2)
    broken = toy_data.ToyData(presets.tiny(2))
    broken.eval_batches = corrupt
    with pytest.raises(ValueError, match="a corrupt held-out image"):
        train("full", broken, tmp_path, settings, model_preset="tiny", progress=False)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    trained = model_weights(tmp_path)
    assert not (tmp_path / "training_summary.json").exists()
    summary = train("full", toy_data.ToyData(presets.tiny(2)), tmp_path, settings, model_preset="tiny", resume=True,
                    progress=False)
    assert summary["steps"] == 2 and summary["validation"]["final"]
    assert all(torch.equal(weights, trained[name]) for name, weights in model_weights(tmp_path).items())


def test_activation_checkpointing_trains_the_same_run(tmp_path, reference):
    output = tmp_path / "run"
    run(_command(output, "--set", "activation_checkpointing=true"))
    losses, expected = _losses(output), _losses(reference)
    assert sorted(losses) == sorted(expected)
    assert all(abs(losses[step] - expected[step]) <= 1e-6 for step in expected)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, reference):
    """accelerate launch with the shipped DDP config, 2 CPU processes (gloo): micro-batch 2 per process, global
    batch 4, as the reference.

    accelerate 1.15's `--cpu` launcher runs one process unless mpirun is set up, so the config uses the
    torch.distributed launcher (MULTI_GPU); without a GPU the trainer asks accelerate for the CPU (MULTI_CPU).
    """
    output = tmp_path / "ddp"
    launch = [str(Path(train_command()[0]).parent / "accelerate"), "launch", "--config_file",
              str(CONFIGS / "ddp.yaml"), "--main_process_port", "29517", "-m"]
    command = _command(output)
    run(launch + command[2:], timeout=180)  # drop "python -m"
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["num_processes"] == 2
    distributed, single = _losses(output), _losses(reference)
    assert sorted(distributed) == sorted(single)
    for step in single:
        assert abs(distributed[step] - single[step]) <= 1e-4 * max(1.0, abs(single[step])), (step, distributed, single)
    reference_weights, weights = model_weights(reference), model_weights(output)
    assert max((weights[k] - reference_weights[k]).abs().max().item() for k in weights) < 1e-3


def test_the_shipped_accelerate_configs_name_what_exists():
    """Each config parses, says its kind, and (FSDP) wraps layer classes that exist: a typo there would silently
    wrap nothing."""
    import yaml
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from visor.modeling.cross_attention import CrossAttentionBlock

    configs = {path.stem: yaml.safe_load(path.read_text()) for path in CONFIGS.glob("*.yaml")}
    assert {name: config["distributed_type"] for name, config in configs.items()} == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED"}
    wrapped = configs["fsdp"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped == [cls.__name__ for cls in (SiglipEncoderLayer, Qwen2DecoderLayer, CrossAttentionBlock)]
    assert configs["deepspeed-zero2"]["deepspeed_config"]["zero_stage"] == 2
