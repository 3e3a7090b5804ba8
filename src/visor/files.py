"""Writing result files atomically: a reader (or a resumed run) sees the old file or the whole new one.

Each writer fills a temporary file next to the target (same folder, so the rename stays on one file system),
flushes it to disk and renames it into place; if writing fails, the temporary file is removed and the target is
left as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write instead of `path`; it replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, value) -> Path:
    return write_text(path, json.dumps(value, indent=2) + "\n")


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as an image file (the format follows the suffix)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format=path.suffix.lstrip("."))
    return path
