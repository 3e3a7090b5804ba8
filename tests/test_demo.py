"""`visor demo`: the interim main job prints one table row per configuration and generates for each."""

from __future__ import annotations

import io
import re

from visor import cli
from visor.demo import run_demo


def test_demo_prints_a_row_per_configuration(capsys):
    assert cli.main(["demo", "--layers", "4", "--new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(line for line in lines if line.startswith("config |"))
    assert "prefill ms" in header and "SA layers" in header
    rows = [line.split(" | ") for line in lines if re.match(r"^\d+ \| ", line)]
    # 4 layers: CA [0], SA candidates [1], configurations [[], [1]]
    assert [row[0] for row in rows] == ["0", "1"]
    assert [row[1] for row in rows] == ["[]", "[1]"]
    assert all(len(row) == len(header.split(" | ")) for row in rows)
    assert all(len(row[-1].split()) == 3 for row in rows), "three generated ids per row"


def test_run_demo_rows_are_consistent():
    """More SA layers cost more prefill FLOPs, and every configuration is cheaper than the full model."""
    rows = run_demo(num_layers=6, new_tokens=2, out=io.StringIO())
    assert [row["sa_layers"] for row in rows] == [[], [1], [1, 4]]
    assert all(len(generated) == 2 for row in rows for generated in row["generated"])
    flops = [row["llm_prefill_flops"] for row in rows]
    assert flops == sorted(flops) and len(set(flops)) == 3
    assert all(0 < row["flops_ratio"] < 1 for row in rows)
    visual_kv = [row["kv_bytes_visual"] for row in rows]
    assert visual_kv == sorted(visual_kv) and len(set(visual_kv)) == 3, "each SA layer adds visual KV cache"
