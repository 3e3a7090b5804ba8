"""The README says what is true: its Python block and its commands run as written (its tables are generated from
the committed results: tests/test_docs_figures.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_block_runs(tmp_path, capsys):
    """The block as written, on the shipped tiny model and a generated image in place of the real ones."""
    from PIL import Image

    text = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "cat.png")
    shipped = ROOT / "src" / "visor" / "demo" / "checkpoint"
    code = block.replace("/models/llava-onevision-qwen2-0.5b-ov-hf", str(shipped)).replace(
        '"cat.png"', repr(str(tmp_path / "cat.png")))
    assert code != block
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("['")


def test_readme_question_to_the_shipped_model_runs_as_written(tmp_path, monkeypatch, capsys):
    import shlex

    from visor import cli

    text = (ROOT / "README.md").read_text()
    block = text[text.index("ships in `src/visor/demo/checkpoint`"):]
    block = block[block.index("```bash\n") + 8:block.index("```", block.index("```bash\n") + 8)]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [command[:2] for command in commands] == [["visor", "data"], ["visor", "generate"]]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src" / "visor" / "demo").mkdir(parents=True)
    (tmp_path / "src" / "visor" / "demo" / "checkpoint").symlink_to(ROOT / "src" / "visor" / "demo" / "checkpoint")
    for command in commands:
        assert cli.main(command[1:]) == 0
    assert "answer:" in capsys.readouterr().out


def test_readme_own_model_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The "own model and data" block line by line through `visor`'s CLI, in a folder holding a tiny stock
    checkpoint (`my-llava-ov`), the LLaVA-format fixture (`my-data`) and an image (`photo.png`); only the step
    counts shrink."""
    import shlex
    import shutil
    import sys

    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor import cli, presets
    from visor.data.tokenizer import build_tokenizer

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from conversation_fixture import fixture_records, write_llava_fixture

    text = (ROOT / "README.md").read_text()
    block = text[text.index("### On your own model and data"):]
    block = block[block.index("```bash\n") + 8:block.index("```", block.index("```bash\n") + 8)]
    commands = [shlex.split(line.replace("--max-steps 300", "--max-steps 3")) for line in block.splitlines() if line]
    assert [command[:2] for command in commands] == [
        ["visor", "convert"], ["visor", "train"], ["visor", "train"], ["visor", "evaluate"], ["visor", "generate"]]

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(presets.tiny(2)).save_pretrained("my-llava-ov")
    build_tokenizer().save_pretrained("my-llava-ov")
    write_llava_fixture(tmp_path / "my-data")
    shutil.copyfile(tmp_path / "my-data" / fixture_records()[0]["image"], "photo.png")
    for command in commands:
        assert cli.main(command[1:]) == 0, command
    out = capsys.readouterr().out
    assert "configuration" in out and "answer:" in out
    assert (tmp_path / "runs" / "my-universal" / "model" / "config.json").is_file()


def test_readme_qwen_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The Qwen2.5-VL block through `visor`'s CLI, on a tiny folder laid out as Qwen2.5-VL is released."""
    import shlex
    import shutil
    import sys

    from visor import cli

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    sys.path.insert(0, str(ROOT / "tests"))
    from conversation_fixture import fixture_records, write_llava_fixture
    from released_checkpoints import write_released_checkpoint

    text = (ROOT / "README.md").read_text()
    block = text[text.index("A Qwen2.5-VL folder as released"):]
    block = block[block.index("```bash\n") + 8:block.index("```", block.index("```bash\n") + 8)]
    commands = [shlex.split(line.replace("--max-steps 300", "--max-steps 2")) for line in block.splitlines() if line]
    assert [command[:2] for command in commands] == [["visor", "convert"], ["visor", "train"], ["visor", "generate"]]

    monkeypatch.chdir(tmp_path)
    write_released_checkpoint("qwen2.5-vl", tmp_path / "my-qwen2.5-vl")
    write_llava_fixture(tmp_path / "my-data")
    shutil.copyfile(tmp_path / "my-data" / fixture_records()[0]["image"], "photo.png")
    for command in commands:
        assert cli.main(command[1:]) == 0, command
    assert "answer:" in capsys.readouterr().out
