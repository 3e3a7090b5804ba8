"""Every document a source or test file cites is in the repository (a user who clones it can follow them)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from docs_figures import documents  # noqa: E402  (the documents a user reads: README.md, docs/, benchmarks/)

# A cited document: a path into one of the repository's folders (or a folder it does not have, such as notes), or
# a Markdown file named in capitals (README.md, TRAINING.md); lower-case names such as report.md are files the
# code writes, not documents.
CITATION = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|scripts|src|tests|notes)/[\w./-]*[\w/]|[A-Z][A-Z_]*\.md)")


def citations(path: Path):
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        for match in CITATION.finditer(line):
            yield number, match.group(1).rstrip(".")


def exists(reference: str, citing: Path) -> bool:
    """A path: found from the repository root or the citing file's folder; a bare name: somewhere in it."""
    if "/" not in reference:
        return any(not {".venv", "runs", ".git"} & set(found.relative_to(ROOT).parts) for found in ROOT.rglob(reference))
    return (ROOT / reference).exists() or (citing.parent / reference).exists()


def citing_files() -> list[Path]:
    """The code, the tests, the scripts and the documents a user reads."""
    code = [path for folder in ("src", "tests", "scripts") for path in (ROOT / folder).rglob("*")
            if path.suffix in (".py", ".md", ".yaml", ".sh") and path.is_file() and path != Path(__file__)]
    return code + documents(ROOT)


def test_every_cited_document_exists():
    files = citing_files()
    assert len(files) > 50
    missing = [f"{path.relative_to(ROOT)}:{number}: {reference}" for path in files
               for number, reference in citations(path) if not exists(reference, path)]
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


# An issue tracker's thread: a clone does not have it.
ISSUE = re.compile(r"\bissues? ?#?\d+|\bthe [\w-]+ issue\b|(?<![\w&])#\d+\b", re.IGNORECASE)


def test_no_file_cites_an_issue():
    cited = [f"{path.relative_to(ROOT)}:{number}: {match.group(0)}" for path in citing_files()
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
             for match in ISSUE.finditer(line)]
    assert not cited, "cites an issue a clone does not have:\n" + "\n".join(cited)


def test_the_check_finds_a_missing_document(tmp_path):
    # The absent names are built here, so that this file cites no document itself.
    absent_document, absent_note = "ABSENT_GUIDE" + ".md", "notes" + "/absent.md"
    citing = ROOT / "tests" / "test_references.py"
    assert exists("docs/architecture.md", citing) and exists("README.md", citing)
    assert not exists(absent_document, citing) and not exists(absent_note, citing)
    sample = tmp_path / "sample.py"
    sample.write_text(f'"""See {absent_document} 2.3, {absent_note} and docs/architecture.md."""\n')
    assert [reference for _, reference in citations(sample)] == [absent_document, absent_note, "docs/architecture.md"]
    assert ISSUE.search("as issue " + "26 asks") and ISSUE.search("see " + "#41") and ISSUE.search("the serving " + "issue")
    assert not ISSUE.search("color #ff0000, an issue of memory")
