import random

import numpy as np
import pytest
import torch
from torch import nn

from visor.training import checkpoint as ckpt


class _Model(nn.Module):
    """Stands in for a transformers model: save_pretrained writes one file."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def save_pretrained(self, path, safe_serialization=True):
        path.mkdir(parents=True)
        torch.save(self.state_dict(), path / "weights.pt")


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = _Model()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert [step for step, _ in ckpt.complete_checkpoints(tmp_path)] == [4, 6]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000006"
    assert not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))


def test_half_written_and_unmarked_checkpoints_are_ignored(tmp_path):
    model = _Model()
    ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3})
    root = ckpt.checkpoint_root(tmp_path)
    (root / ".tmp-step-000009-123" / "model").mkdir(parents=True)  # killed while writing
    (root / "step-000012").mkdir()  # a complete-looking name without its marker
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000003"
    ckpt.remove_partial_checkpoints(tmp_path)
    assert not (root / ".tmp-step-000009-123").exists()


def test_training_state_loads_with_weights_only_and_restores_rng(tmp_path):
    model = _Model()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"step": 5, "rng": ckpt.rng_state(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    ckpt.save_checkpoint(tmp_path, 5, model, state)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    loaded = ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path))  # weights_only=True inside
    ckpt.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_unreadable_state_is_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _Model(), {"step": 1})
    path = ckpt.latest_checkpoint(tmp_path)
    (path / ckpt.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        ckpt.load_training_state(path)
