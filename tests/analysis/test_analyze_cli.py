"""`visor analyze` end to end on a tiny random full model saved to a folder (a few prompts per task)."""

from __future__ import annotations

import argparse
import json

import pytest

from visor.analysis import cli
from visor.cli import run_command
from visor.analysis.placement import paired_comparison
from visor.analysis.sensitivity import spans
from visor import VisorConfig

OUTPUTS = ("attention_share", "drift", "sensitivity", "placement")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="visor")
    cli.register(main.add_subparsers(dest="command", required=True))
    return main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, stock_factory):
    folder = tmp_path_factory.mktemp("full")
    stock_factory("tiny", num_layers=4, attention="sdpa").save_pretrained(folder)
    return folder


def test_analyze_end_to_end(model_dir, tmp_path, capsys):
    output = tmp_path / "analysis"
    args = parser().parse_args(["analyze", "--model", str(model_dir), "--data", "synthetic@demo", "--output",
                                str(output), "--per-task", "2", "--max-new-tokens", "2", "--train-steps", "2,2",
                                "--no-progress"])
    assert args.func(args) == 0
    for name in OUTPUTS:
        assert (output / f"{name}.json").is_file() and (output / f"{name}.png").stat().st_size > 0
    summary = json.loads((output / "summary.json").read_text())
    config = VisorConfig.from_json_file(output / "visor_config.json")
    assert config.cross_attention_layers == summary["proposed"]["cross_attention_layers"]
    assert config.self_attention_layers == summary["proposed"]["self_attention_layers"]
    assert summary["default"]["cross_attention_layers"] == [0] and len(config.self_attention_layers) == 1
    assert [row["flops_ratio"] for row in summary["equal_flops"]] == pytest.approx([1.0, 1.0])
    table = json.loads((output / "placement.json").read_text())["table"]
    assert [row["schedule"] for row in table] == ["proposed"] * 2 + ["default"] * 2 + ["full"]
    assert table[-1]["savings"] == 1.0 and all(row["savings"] > 1.0 for row in table[:-1])
    sensitivity = json.loads((output / "sensitivity.json").read_text())
    assert len(sensitivity["spans"]) == 10  # every span of a 4-layer model
    shares = json.loads((output / "attention_share.json").read_text())
    assert set(shares["task_groups"]) == {"easy", "hard"}
    trained = summary["trained_equal_flops"]
    assert [row["configuration"] for row in trained] == [0, 1]
    assert set(trained[0]["test"]) == {"proposed", "default", "only_proposed", "only_default", "sign_test_p"}
    assert (output / "trained" / "proposed" / "universal" / "model" / "config.json").is_file()
    printed = capsys.readouterr().out
    assert "proposed: CA" in printed and "trained accuracy" in printed


def test_bad_input_is_a_clear_error(model_dir, tmp_path, capsys):
    args = parser().parse_args(["analyze", "--model", str(tmp_path / "missing"), "--data", "synthetic@demo",
                                "--output", str(tmp_path / "out"), "--no-progress"])
    assert run_command(args) == 2 and "does not exist" in capsys.readouterr().err
    args = parser().parse_args(["analyze", "--model", str(model_dir), "--data", "synthetic@demo", "--output",
                                str(tmp_path / "out"), "--per-task", "0"])
    assert run_command(args) == 2 and "per_task" in capsys.readouterr().err


def test_spans():
    assert spans(3) == [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3), (0, 3)]
    assert spans(4, [4]) == [(0, 4)]
    with pytest.raises(ValueError, match="out of range"):
        spans(3, [4])


def test_paired_comparison_counts_discordant_prompts():
    result = paired_comparison([True] * 10 + [False] * 5, [False] * 10 + [False] * 5)
    assert result == {"only_proposed": 10, "only_default": 0, "sign_test_p": pytest.approx(2 / 1024, abs=1e-4)}
    assert paired_comparison([True, False], [False, True])["sign_test_p"] == 1.0
    assert paired_comparison([True], [True])["sign_test_p"] == 1.0


def test_analyze_reads_a_video_suite_as_visual_tokens(model_dir, tmp_path):
    """On clips, the video tokens are the visual ("image") group whose attention share is measured."""
    output = tmp_path / "analysis"
    args = parser().parse_args(["analyze", "--model", str(model_dir), "--data", "synthetic@video:which_frame,"
                                "dominant_color_video", "--output", str(output), "--per-task", "2",
                                "--max-new-tokens", "2", "--no-progress"])
    assert args.func(args) == 0
    share = json.loads((output / "attention_share.json").read_text())["tasks"]
    for task in ("which_frame", "dominant_color_video"):
        # A clip's tokens are most of the prompt: counted as text, the "image" group would hold nothing.
        assert share[task]["uniform"]["question"]["image"] > 0.5
        assert all(value > 0 for value in share[task]["shares"]["question"]["image"])
