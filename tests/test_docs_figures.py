"""The docs' generated tables are what scripts/docs_figures.py writes from the committed result files, and each
committed demo report is what its results give."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from docs_figures import (  # noqa: E402
    BLOCK, documents, render, render_seeds, render_value, result_files, stale_documents, untraced_figures,
)


def blocks(root: Path) -> list[tuple[Path, str]]:
    return [(path, match["spec"]) for path in documents(root) for match in BLOCK.finditer(path.read_text())]


def test_every_generated_block_is_what_its_results_give():
    assert len(blocks(ROOT)) >= 3  # README's speed table and the engine benches: the check checks something
    assert list(stale_documents()) == [], "run .venv/bin/python scripts/docs_figures.py"


def test_changing_one_committed_number_makes_the_check_fail(tmp_path):
    path, spec = next((path, spec) for path, spec in blocks(ROOT) if spec.startswith("engine"))
    results = spec.split()[1]
    for name in (path.relative_to(ROOT), *result_files(path.read_text())):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    assert list(stale_documents(tmp_path)) == []
    rows = json.loads((tmp_path / results).read_text())
    rows[-1]["concurrent"][-1]["decode_tokens_per_s"] *= 1.5
    (tmp_path / results).write_text(json.dumps(rows))
    stale = stale_documents(tmp_path)
    assert list(stale) == [str(path.relative_to(ROOT))]
    (tmp_path / path.relative_to(ROOT)).write_text(stale[str(path.relative_to(ROOT))])
    assert list(stale_documents(tmp_path)) == []


def test_an_unknown_renderer_is_named():
    with pytest.raises(ValueError, match="unknown renderer 'plots'"):
        render("<!-- results: plots x.json -->\n<!-- /results -->", ROOT, "doc.md")


@pytest.mark.parametrize("run", sorted(path.parent.name for path in (ROOT / "docs").glob("*/results.json")))
def test_every_committed_demo_report_is_what_its_results_give(run):
    """A demo run's report.md is rendered from its results.json (`visor.demo.report.markdown`): a change of the
    report's wording, or of a committed number, shows here."""
    from visor.demo.report import markdown

    folder = ROOT / "docs" / run
    assert (folder / "report.md").read_text() == markdown(json.loads((folder / "results.json").read_text())), \
        f"regenerate docs/{run}/report.md from its results.json"


def test_no_document_gains_a_figure_no_result_file_wrote():
    """Outside generated blocks and values, no document carries a figure typed by hand."""
    untraced = {str(path.relative_to(ROOT)): untraced_figures(path.read_text()) for path in documents(ROOT)}
    assert {name: figures for name, figures in untraced.items() if figures} == {}


def test_untraced_figures_finds_measured_numbers_and_leaves_the_rest():
    text = ("CA only ran 12.9x faster, 98.3% hard, in 7 min or 45 s, 1.5 points up; 4x is a setting, 24 layers a "
            "shape, Python 3.11 and transformers < 5.20 versions, `0.5` code, "
            "<!-- value: f.json a | {:.1f}x -->3.1x<!-- /value --> rendered.\n"
            "<!-- results: demo f.json -->\n| 96.5 |\n<!-- /results -->\n```\n1.25 s\n```\n")
    assert untraced_figures(text) == ["12.9x", "98.3", "7 min", "45 s", "1.5"]


def test_a_value_is_arithmetic_of_its_file(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"method": "full", "setting": "SA [1]", "s": 8.0},
                                                          {"method": "visor", "setting": "SA [1]", "s": 2.0}],
                                                 "stages": {"train": {"seconds": 90}}}))
    full, visor = "rows[method=full;setting=SA [1]].s", "rows[method=visor].s"
    assert render_value(tmp_path, f"r.json {full} / {visor} | {{:.1f}}x") == "4.0x"
    assert render_value(tmp_path, f"r.json ( {full} + {visor} ) / 2 - 1") == "4"
    assert render_value(tmp_path, "r.json stages.train.seconds / 60 | {:.1f} min") == "1.5 min"
    with pytest.raises(ValueError, match="0 rows match"):
        render_value(tmp_path, "r.json rows[method=pool].s")
    with pytest.raises(ValueError, match="no 'test'"):
        render_value(tmp_path, "r.json stages.test")


def test_the_seeds_summary_counts_what_the_table_shows(tmp_path):
    """The seeds renderer's sentences count the table's cells: a router pushed below the curve at one seed is one
    case fewer at or above it, and beyond the noise only if its gap exceeds that noise."""
    run = json.loads((ROOT / "docs/two-hop/results.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(run))
    router = next(row for row in run["stages"]["policy"]["test"]
                  if row["method"] == "router" and row["subset"] == "group:hard")
    router["curve_gap"], router["curve_gap_noise"] = -5.0, 8.0
    (tmp_path / "b.json").write_text(json.dumps(run))
    baseline = render_seeds(tmp_path, "a.json", "a.json")
    changed = render_seeds(tmp_path, "a.json", "b.json")
    assert "| -5.0 ± 8.0 |" in changed
    at_or_above = int(re.search(r"at or above the fixed curve in (\d+) of 8", baseline)[1])
    beyond = int(re.search(r"of 8 cases \(seed × split × τ\), beyond the noise in (\d+)", baseline)[1])
    assert f"in {at_or_above - 1} of 8 cases (seed × split × τ), beyond the noise in {beyond - 1}." in changed
