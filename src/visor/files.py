"""Writing result files atomically: a reader (or a resumed run) sees the old file or the whole new one; and output
paths checked before any work starts.

Each writer fills a temporary file next to the target (same folder, so the rename stays on one file system),
flushes it to disk and renames it into place; if writing fails, the temporary file is removed and the target is
left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
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


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder to fill instead of `path`; it replaces `path` when the block ends without error. The old
    folder is removed only after the new one is in place, and only if it is empty or a checkpoint (see
    `check_replaceable`): a folder of other things is never deleted."""
    path = check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, folder: str | os.PathLike, processor=None, **options) -> Path:
    """`model.save_pretrained(folder, **options)`, and its tokenizer's or processor's, as one atomic folder write."""
    with atomic_folder(folder) as temporary:
        model.save_pretrained(temporary, **options)
        if processor is not None:
            processor.save_pretrained(temporary)
    return Path(folder)


def check_replaceable(path: str | os.PathLike, option: str = "output") -> Path:
    """`path` if a new checkpoint may replace what it holds: nothing, an empty folder or a checkpoint folder."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ValueError(f"{option} {path} holds files but no checkpoint (config.json); refusing to replace it: "
                         "choose a new or empty folder")
    return path


def check_output(path: str | os.PathLike, kind: str, option: str = "--output") -> Path:
    """`path` if a command can write its output there (`kind` "folder", "file", or "model": a folder a checkpoint
    will replace); else a ValueError saying why, raised before any work starts (not after an hour's benchmark)."""
    path = Path(path)
    if kind in ("folder", "model") and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")
    existing = next(parent for parent in (path, *path.parents) if parent.exists() or parent == Path(parent.anchor))
    if existing != path and not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {existing} is a file")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be written: no permission in {existing}")
    return check_replaceable(path, option) if kind == "model" else path
