"""The README says what is true: its demo table is what the committed run (docs/demo/results.json) measured,
number for number, and its Python block runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_demo_rows() -> list[list[str]]:
    """Cells of the table under "What `make demo` shows" (method and setting first, then 4 numbers)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What `make demo` shows"):text.index("![accuracy vs LLM prefill FLOPs")]
    rows = [[cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")]
    return [row for row in rows[1:] if not set(row[0]) <= {"-"}]  # skip the header and its rule


def test_readme_demo_table_matches_the_committed_run():
    results = json.loads((ROOT / "docs" / "demo" / "results.json").read_text())
    groups = {(r["method"], r["setting"], r["group"]): r for r in results["groups"]}
    settings = {(method, setting) for method, setting, _ in groups}
    rows = readme_demo_rows()
    assert len(rows) >= 10
    for method, setting, hard_accuracy, hard_savings, easy_accuracy, easy_savings in rows:
        matches = [s for m, s in settings if m == method and setting.startswith(s)]
        assert len(matches) == 1, f"README row {method} {setting!r} matches {matches} in docs/demo/results.json"
        for group, accuracy, savings in (("hard", hard_accuracy, hard_savings), ("easy", easy_accuracy, easy_savings)):
            measured = groups[(method, matches[0], group)]
            assert accuracy == f"{measured['accuracy']:.1f}", f"{method} {setting} {group} accuracy"
            assert savings == f"{measured['savings']:.2f}x", f"{method} {setting} {group} savings"
    tau = re.search(r"τ = ([0-9.]+)", next(row[1] for row in rows if row[0] == "visor-policy"))
    assert tau and float(tau.group(1)) == results["stages"]["policy"]["threshold"]


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
