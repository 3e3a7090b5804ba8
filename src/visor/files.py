"""Writing result files atomically: a reader (or a resumed run) sees the old file or the whole new one; and output
paths checked before any work starts.

Each writer fills a temporary file next to the target (same folder, so the rename stays on one file system),
flushes it to disk and renames it into place; if writing fails, the temporary file is removed and the target is
left as it was.

A model folder that a command writes replaces the folder there as a whole, so what it may replace is narrow: an
empty folder, or a previous checkpoint (`config.json` and nothing but the files a checkpoint folder holds:
`CHECKPOINT_FILES`), and never a folder the command reads, nor one that holds it (`reads`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The processor's own settings, which a checkpoint folder holds besides the model and the tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
# Everything a checkpoint folder holds (`save_pretrained` of a model and its tokenizer, the processor settings,
# `visor configurations search`'s report): a folder of only these is a previous output that a new one may replace.
CHECKPOINT_FILES = frozenset({
    "config.json", "generation_config.json", "search.json", *TOKENIZER_FILES, *PROCESSOR_FILES})
WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


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


def read_json(path: str | os.PathLike, kind: type = dict):
    """The JSON value in `path`, which must be a `kind` (an object, or a list); a ValueError names the file
    otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, kind):
        what = "a JSON object" if kind is dict else f"a {kind.__name__} of records"
        raise ValueError(f"{path} must hold {what}, got {type(value).__name__}")
    return value


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as an image file (the format follows the suffix)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format=path.suffix.lstrip("."))
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike, reads: Iterable = ()) -> Iterator[Path]:
    """A temporary folder to fill instead of `path`; it replaces `path` when the block ends without error. The old
    folder is removed only after the new one is in place, and only if `check_replaceable` lets it go: a folder of
    other things, or one the writer `reads` from, is never deleted."""
    path = check_replaceable(path, reads=reads)
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


def check_replaceable(path: str | os.PathLike, option: str = "output", reads: Iterable = ()) -> Path:
    """`path` if a new checkpoint may replace what it holds: nothing, an empty folder or a previous checkpoint (a
    config.json and nothing but `CHECKPOINT_FILES`), and neither one of the folders `reads` nor one that holds it."""
    path = check_not_an_input(path, reads, option)
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not (path / "config.json").is_file():
        raise ValueError(f"{option} {path} holds files but no checkpoint (config.json); refusing to replace it: "
                         "choose a new or empty folder")
    foreign = sorted(entry.name for entry in path.iterdir()
                     if not (entry.is_file() and (entry.name in CHECKPOINT_FILES or WEIGHT_FILE.fullmatch(entry.name))))
    if foreign:
        raise ValueError(f"{option} {path} holds a checkpoint and other things ({', '.join(foreign)}): it is not a "
                         "previous output, and replacing it would delete them; choose a new or empty folder")
    return path


def check_not_an_input(path: str | os.PathLike, reads: Iterable, option: str = "--output") -> Path:
    """`path` unless it is one of the paths `reads` (None entries ignored) or a folder that holds one, after
    resolving `.`, `..` and symbolic links: writing there would replace or mix with what the command reads."""
    path = Path(path)
    target = path.resolve()
    for source in (Path(source) for source in reads if source is not None):
        if target == source.resolve() or target in source.resolve().parents:
            relation = "is" if target == source.resolve() else "holds"
            raise ValueError(f"{option} {path} {relation} the input {source}: writing there would replace or mix "
                             "with what the command reads; choose another folder")
    return path


def check_output(path: str | os.PathLike, kind: str, option: str = "--output", reads: Iterable = ()) -> Path:
    """`path` if a command can write its output there (`kind` "folder", "file", or "model": a folder a checkpoint
    will replace) without touching the paths it `reads`; else a ValueError saying why, raised before any work
    starts (not after an hour's benchmark)."""
    path = check_not_an_input(path, reads, option)
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
