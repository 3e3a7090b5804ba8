"""Atomic, resumable training checkpoints.

Layout of a run directory::

    OUTPUT/checkpoints/step-000200/   a complete checkpoint (it only gets this name once complete)
        model/                        save_pretrained (config.json + model.safetensors)
        training_state.pt             optimizer, scheduler, aux head, RNG states, step (tensors/dicts only)
        complete.json                 written last: {"step": 200, ...}
    OUTPUT/checkpoints/.tmp-step-000400-<pid>/   a checkpoint being written (ignored and cleaned by resume)

A checkpoint is written into a temporary directory, every file is fsync'ed, the marker `complete.json` goes
last, then the directory is renamed into place (`os.replace`, atomic on POSIX) and the parent fsync'ed. Older
complete checkpoints are deleted only after that, so a process killed at any moment leaves the previous
complete checkpoint usable. `training_state.pt` holds only tensors, numbers, strings, lists and dicts and is
read with `torch.load(..., weights_only=True)`: loading a checkpoint never runs pickled code.

`VISOR_FAULT_INJECTION=checkpoint:STEP:SECONDS` (a testing aid) sleeps in the middle of writing the
checkpoint of step STEP, after the model is written and before the marker, so tests can kill a run there.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
MARKER = "complete.json"
STATE_FILE = "training_state.pt"
MODEL_DIR = "model"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Half-written ones are not listed."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary directories left by a run killed while writing a checkpoint."""
    root = checkpoint_root(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ---- RNG state (weights_only-safe) -----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))


# ---- writing -----------------------------------------------------------------------------------------------
def _fsync_tree(path: Path) -> None:
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _injected_pause(step: int) -> None:
    spec = os.environ.get("VISOR_FAULT_INJECTION", "")
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == "checkpoint" and int(parts[1]) == step:
        time.sleep(float(parts[2]))


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model,
    training_state: dict[str, Any],
    keep: int = 1,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically (see the module docstring) and prune to the newest `keep`."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    temporary = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    options = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(temporary / MODEL_DIR, safe_serialization=True, **options)
    torch.save(training_state, temporary / STATE_FILE)
    _injected_pause(step)
    with open(temporary / MARKER, "w") as handle:
        json.dump({"step": step, "time": time.time()}, handle)
    _fsync_tree(temporary)
    if final.exists():  # an older complete checkpoint of the same step (re-run after resume): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_dir(root)
    for _, old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable state is the same user-facing problem
        raise ValueError(f"checkpoint {checkpoint} has an unreadable {STATE_FILE}: {error}") from error
