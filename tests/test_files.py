"""Atomic writes: the target is the old file (or folder) or the whole new one, and no temporary is left behind;
output paths checked before work."""

from __future__ import annotations

import json

import pytest

from visor.files import atomic_folder, atomic_path, check_output, check_replaceable, write_json, write_text


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
        (folder / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as folder:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "model.safetensors"]
    with atomic_folder(target) as folder:
        (folder / "config.json").write_text("{}")
    assert [path.name for path in target.iterdir()] == ["config.json"]  # the old weights went with the old folder
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds files but no checkpoint"), atomic_folder(tmp_path):
        pass
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_a_checkpoint_folder_with_other_files_is_never_replaced(tmp_path):
    """Another model's folder (a README beside its weights) is not a previous output: replacing it would delete
    the README."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (model / name).write_text("x")
    with pytest.raises(ValueError, match=r"holds a checkpoint and other things \(README.md\)"), \
            atomic_folder(model) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(path.name for path in model.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_previous_checkpoint_folder_may_be_replaced(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "search.json"):
        (model / name).write_text("x")
    assert check_replaceable(model) == model


@pytest.mark.parametrize("spell", [
    lambda input_: input_,
    lambda input_: input_ / ".",  # D/./
    lambda input_: input_.parent / "link",  # a symbolic link to it
    lambda input_: input_ / ".." / input_.name,
])
def test_an_output_is_never_an_input_however_it_is_spelled(tmp_path, spell):
    source = tmp_path / "stock"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(source)
    output = spell(source)
    for kind in ("folder", "model"):
        with pytest.raises(ValueError, match=f"output {output} is the input {source}"):
            check_output(output, kind, reads=[source])
    with pytest.raises(ValueError, match="is the input"), atomic_folder(output, reads=[source]):
        pass
    with pytest.raises(ValueError, match=f"output {tmp_path} holds the input {source}"):
        check_output(tmp_path, "model", reads=[None, source])
    assert [path.name for path in source.iterdir()] == ["config.json"]
    assert check_output(tmp_path / "other", "model", reads=[source, None]) == tmp_path / "other"


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
