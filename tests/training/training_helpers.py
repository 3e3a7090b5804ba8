"""Helpers for the training tests: fast settings, CLI runs in subprocesses, weight loading.

A module of its own (not conftest.py, of which tests/ has several) so that test files import it by a unique name.

Runs use the tiny preset with 2-4 text layers, fp32, batch 4, one thread per process, and the toy data source
(`toy_data.py`, `--data toy_data:build`), so each subprocess run takes a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from visor.training import TrainingSettings, load_settings

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PYTHON = sys.executable
TOY = "toy_data:build"

# Settings every subprocess run shares (fp32, tiny, quick); tests add --max-steps / --save-every / --set ….
FAST = {
    "batch_size": 4,
    "mixed_precision": "no",
    "model_layers": 2,
    "eval_every": 0,
    "samples_per_task": 2,
    "log_every": 1,
    "warmup_steps": 2,
    "num_threads": 1,
}


def fast_settings(recipe: str = "full", **overrides) -> TrainingSettings:
    """The recipe's defaults (as the CLI builds them) with the quick test values on top."""
    return load_settings(recipe, None, FAST | overrides)


def set_flags(**overrides) -> list[str]:
    flags = []
    for key, value in (FAST | overrides).items():
        flags += ["--set", f"{key}={value}"]
    return flags


def subprocess_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_DISABLE="1")
    env.update(extra)
    return env


def train_command(*args: str) -> list[str]:
    return [PYTHON, "-m", "visor.training", "train", *args, "--no-progress"]


def run(command: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))
