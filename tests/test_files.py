"""Atomic writes: the target is the old file or the whole new one, and no temporary file is left behind."""

from __future__ import annotations

import json

import pytest

from visor.files import atomic_path, write_json, write_text


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "deep" / "results.json"
    write_json(target, {"rows": [1, 2]})
    assert json.loads(target.read_text()) == {"rows": [1, 2]}
    write_text(target, "new")
    assert target.read_text() == "new" and [path.name for path in target.parent.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(TypeError):
        write_json(target, {"not": object()})
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
