"""Atomic writes: the target is the old file (or folder) or the whole new one, and no temporary is left behind;
output paths checked before work."""

from __future__ import annotations

import json

import pytest

from visor.files import atomic_folder, atomic_path, check_output, write_json, write_text


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


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as folder:
        (folder / "config.json").write_text("{}")
        (folder / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as folder:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "weights"]
    with atomic_folder(target) as folder:
        (folder / "config.json").write_text("{}")
    assert [path.name for path in target.iterdir()] == ["config.json"]  # the old weights went with the old folder
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds files but no checkpoint"), atomic_folder(tmp_path):
        pass
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("kind, make, message", [
    ("folder", lambda root: (root / "x").write_text(""), "is a file, not a folder"),
    ("model", lambda root: (root / "x").write_text(""), "is a file, not a folder"),
    ("file", lambda root: (root / "x").mkdir(), "is a folder, not a file"),
    ("model", lambda root: (root / "x").mkdir() or (root / "x" / "notes").write_text(""), "holds files but no checkpoint"),
])
def test_outputs_that_cannot_be_written_are_refused(tmp_path, kind, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message):
        check_output(tmp_path / "x", kind)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot be created: .*file is a file"):
        check_output(tmp_path / "file" / "below" / "x", kind)


def test_outputs_that_can_be_written_pass(tmp_path):
    assert check_output(tmp_path / "new" / "deeper", "folder") == tmp_path / "new" / "deeper"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert check_output(tmp_path / "model", "model") == tmp_path / "model"
    assert check_output(tmp_path / "report.json", "file") == tmp_path / "report.json"
