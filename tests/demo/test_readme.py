"""The README's demo table says what the committed run (docs/demo/results.json) measured, number for number."""

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
