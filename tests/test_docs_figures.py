"""The docs' generated tables are what scripts/docs_figures.py writes from the committed result files, and each
committed demo report is what its results give."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from docs_figures import BLOCK, documents, render, stale_documents  # noqa: E402


def blocks(root: Path) -> list[tuple[Path, str]]:
    return [(path, match["spec"]) for path in documents(root) for match in BLOCK.finditer(path.read_text())]


def test_every_generated_block_is_what_its_results_give():
    assert len(blocks(ROOT)) >= 3  # README's speed table and the engine benches: the check checks something
    assert list(stale_documents()) == [], "run .venv/bin/python scripts/docs_figures.py"


def test_changing_one_committed_number_makes_the_check_fail(tmp_path):
    path, spec = next((path, spec) for path, spec in blocks(ROOT) if spec.startswith("engine"))
    results = spec.split()[1]
    named = [other.split()[1] for document, other in blocks(ROOT) if document == path]  # every file it renders
    for name in (path.relative_to(ROOT), *named):
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
