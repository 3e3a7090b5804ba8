"""Conversation data on disk: LLaVA-format JSON files and `datasets` folders of chat messages.

Two formats, read into one record type (`Conversation`: images, chat messages, a task name, where it came from):

- **LLaVA JSON** (LLaVA-1.5 / LLaVA-OneVision instruction data): a list of records with `image` (one path or a
  list of paths, relative to an image folder; absent for a text-only record) and `conversations`, turns
  `{"from": "human" | "gpt" | "system", "value": text}` whose `<image>` placeholders mark where each image goes.
- **a `datasets` folder** (`save_to_disk` output, or a folder of `.parquet` files): an `image` (one image) or
  `images` (a list) column and a `messages` column in the transformers chat format (`role`, `content`; content as
  text with `<image>` placeholders, or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` parts).

A record may carry a `task` (key or column) that evaluation reports accuracy by; otherwise its task is
"conversation". A broken record is an error naming the file and record, or, with `skip_broken=True`, left out and
counted in `ConversationData.skipped`: no assistant turn, or an empty one (it would train "answer nothing");
placeholders that do not match its images; a role or content of the wrong kind; an image that is missing, does
not decode whole (header, size, every pixel, mode: `load_image`) or is smaller than the model's vision patch;
and, in LLaVA JSON, an image path that resolves (`..`, an absolute path, symbolic links followed) outside the
image folder, unless `images_outside_root=True`. Every image is decoded once here, before training writes
anything, so that a broken one is found up front rather than when its batch is built.

Splits: a `datasets.DatasetDict` folder keeps its `train` / `validation` / `test` splits. A single file or
dataset holds out records for evaluation: a fixed permutation (seed 0, whatever the training seed, so every run
holds out the same records) gives 5% (at least one record) to validation, as many to test, the rest to training.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from visor.data.processor import IMAGE_PLACEHOLDER, load_image
from visor.files import read_json

SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.05
HELD_OUT_SEED = 0
DEFAULT_TASK = "conversation"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One record: its images (paths, PIL images or `{"bytes"/"path"}` dicts) in placeholder order, and messages
    `{"role", "content"}` with text content."""

    images: tuple
    messages: tuple[dict, ...]
    task: str
    where: str
    """The file and record, for error messages."""


@dataclass
class ConversationData:
    splits: dict[str, list[Conversation]]
    skipped: list[str] = field(default_factory=list)
    """Why each left-out record was left out (with `skip_broken`)."""


class BrokenRecord(ValueError):
    pass


def read_conversations(kind: str, path: str | Path, image_root: str | Path | None = None,
                       skip_broken: bool = False, images_outside_root: bool = False,
                       min_image_side: int = 1) -> ConversationData:
    """The records of a `llava` JSON file or an `hf` datasets folder, checked and split as the module docstring
    says; `min_image_side`: the model's vision patch, in pixels."""
    path = Path(path)
    if kind == "llava":
        if not path.is_file():
            raise ValueError(f"LLaVA data file {path} does not exist")
        if image_root is not None and not Path(image_root).is_dir():
            raise ValueError(f"image root {image_root} is not a folder")
        records = _llava_records(path, Path(image_root) if image_root is not None else path.parent,
                                 images_outside_root)
        return _collect({None: records}, skip_broken, min_image_side)
    if kind == "hf":
        if image_root is not None or images_outside_root:
            raise ValueError("image_root and images_outside_root are for LLaVA JSON data; a datasets folder holds "
                             "its images")
        return _collect(_hf_records(path), skip_broken, min_image_side)
    raise ValueError(f"unknown conversation format {kind!r}: use 'llava' or 'hf'")


def _collect(by_split: dict[str | None, list], skip_broken: bool, min_image_side: int) -> ConversationData:
    """Records (or the BrokenRecord each raised) with their images decoded, broken ones raised or counted, and
    split."""
    splits: dict[str, list[Conversation]] = {}
    skipped = []
    for split, records in by_split.items():
        kept = []
        for record in records:
            try:
                if isinstance(record, BrokenRecord):
                    raise record
                kept.append(_with_decodable_images(record, min_image_side))
            except BrokenRecord as broken:
                if not skip_broken:
                    raise ValueError(f"{broken} (skip_broken_records=true leaves such records out, counted)") from None
                skipped.append(str(broken))
        splits[split] = kept
    if None in splits:
        splits = hold_out(splits.pop(None))
    for name in SPLITS:
        if not splits.get(name):
            raise ValueError(f"the data has no usable {name} records"
                             + (f" ({len(skipped)} broken ones left out)" if skipped else ""))
    return ConversationData(splits, skipped)


def hold_out(records: list[Conversation]) -> dict[str, list[Conversation]]:
    """Validation and test records drawn by a fixed permutation, the rest for training."""
    if len(records) < 3:
        raise ValueError(f"{len(records)} usable records cannot be split into training, validation and test")
    count = max(1, round(HELD_OUT_FRACTION * len(records)))
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(HELD_OUT_SEED)).tolist()
    validation, test = sorted(order[:count]), sorted(order[count:2 * count])
    held = set(validation) | set(test)
    return {"train": [r for i, r in enumerate(records) if i not in held],
            "validation": [records[i] for i in validation], "test": [records[i] for i in test]}


def _with_decodable_images(record: Conversation, min_side: int) -> Conversation:
    """`record` if every image of it decodes whole and is at least `min_side` px a side; else a BrokenRecord."""
    for number, image in enumerate(record.images):
        try:
            load_image(open_image(image), min_side=min_side)
        except ValueError as error:
            raise BrokenRecord(f"{record.where}: image {number}: {error}") from None
    return record


def _checked(images: list, messages: list, task: Any, where: str) -> Conversation:
    """A Conversation, or a BrokenRecord saying what is wrong with it."""
    if not isinstance(task, str) or not task:
        raise BrokenRecord(f"{where}: task must be non-empty text, got {task!r}")
    placeholders = 0
    for turn, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            raise BrokenRecord(f"{where}: turn {turn} has role {message['role']!r}")
        if not isinstance(message["content"], str):
            raise BrokenRecord(f"{where}: turn {turn} has no text")
        count = message["content"].count(IMAGE_PLACEHOLDER)
        if message["role"] == "assistant":
            if count:
                raise BrokenRecord(f"{where}: assistant turn {turn} holds an {IMAGE_PLACEHOLDER} placeholder")
            if not message["content"].strip():
                raise BrokenRecord(f"{where}: assistant turn {turn} is empty (it would train the model to answer "
                                   "nothing)")
        placeholders += count
    if not any(m["role"] == "assistant" for m in messages):
        raise BrokenRecord(f"{where}: no assistant turn")
    if placeholders != len(images):
        raise BrokenRecord(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    return Conversation(tuple(images), tuple(messages), task, where)


def _llava_records(path: Path, image_root: Path, outside_root: bool) -> list:
    records = read_json(path, list)
    out = []
    for index, record in enumerate(records):
        where = f"{path} record {index}" + (f" (id {record['id']})" if isinstance(record, dict) and "id" in record
                                            else "")
        try:
            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                raise BrokenRecord(f"{where}: no 'conversations' list")
            image = record.get("image")
            names = [] if image is None else [image] if isinstance(image, str) else image
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise BrokenRecord(f"{where}: 'image' must be a path or a list of paths")
            messages = []
            for turn, message in enumerate(record["conversations"]):
                if not isinstance(message, dict) or message.get("from") not in LLAVA_ROLES:
                    raise BrokenRecord(f"{where}: turn {turn} must have 'from' in {sorted(LLAVA_ROLES)}")
                messages.append({"role": LLAVA_ROLES[message["from"]], "content": message.get("value")})
            out.append(_checked([_image_path(image_root, name, outside_root, where) for name in names], messages,
                                record.get("task", DEFAULT_TASK), where))
        except BrokenRecord as broken:
            out.append(broken)
    return out


def _image_path(image_root: Path, name: str, outside_root: bool, where: str) -> Path:
    """`name` under `image_root`; a BrokenRecord where it resolves outside it (unless `outside_root`)."""
    path = image_root / name
    if not outside_root and not path.resolve().is_relative_to(image_root.resolve()):
        raise BrokenRecord(f"{where}: image {name} lies outside the image root {image_root} (images_outside_root "
                           "/ --images-outside-root lets a data file name images elsewhere)")
    return path


def _hf_records(path: Path) -> dict[str, list]:
    import datasets

    if not path.is_dir():
        raise ValueError(f"datasets folder {path} does not exist")
    parquet = sorted(path.glob("*.parquet"))
    if parquet:
        loaded: Any = datasets.Dataset.from_parquet([str(file) for file in parquet])
    else:
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise ValueError(f"{path} is neither a datasets folder (save_to_disk) nor a folder of .parquet "
                             "files") from error
    if isinstance(loaded, datasets.DatasetDict):
        unknown = sorted(set(loaded) - set(SPLITS))
        if unknown:
            raise ValueError(f"{path} has splits {unknown}; use {list(SPLITS)}")
        return {split: _rows(loaded[split], f"{path} [{split}]") for split in loaded}
    return {None: _rows(loaded, str(path))}


def _rows(dataset, where: str) -> list:
    """Records of one dataset; images are kept undecoded (their bytes) until a batch needs them."""
    import datasets

    columns = dataset.column_names
    image_column = next((name for name in ("images", "image") if name in columns), None)
    if "messages" not in columns:
        raise ValueError(f"{where} has no 'messages' column (columns: {columns})")
    if image_column == "image":
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    elif image_column == "images":
        dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    out = []
    for index, row in enumerate(dataset):
        name = f"{where} row {index}"
        try:
            images = [] if image_column is None else row[image_column]
            images = [] if images is None else [images] if image_column == "image" else list(images)
            out.append(_checked([_undecoded(image, name) for image in images], _chat_messages(row["messages"], name),
                                row.get("task", DEFAULT_TASK), name))
        except BrokenRecord as broken:
            out.append(broken)
    return out


def _undecoded(image: Any, where: str):
    if not isinstance(image, dict) or not (image.get("bytes") or image.get("path")):
        raise BrokenRecord(f"{where}: an image without bytes or path")
    return image if image.get("bytes") else Path(image["path"])


def _chat_messages(messages: Any, where: str) -> list[dict]:
    """transformers chat messages with text content (`<image>` where an image part was)."""
    if not isinstance(messages, list):
        raise BrokenRecord(f"{where}: messages must be a list")
    out = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BrokenRecord(f"{where}: message {turn} has no role")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append(IMAGE_PLACEHOLDER)
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    raise BrokenRecord(f"{where}: message {turn} has a content part of type {kind!r}")
            content = "\n".join(parts)
        out.append({"role": message["role"], "content": content})
    return out


def open_image(image):
    """A record's image as the processor takes it: a path, or a PIL image of its stored bytes (a ValueError where
    Pillow cannot read them; `load_image` says the same of a file)."""
    if isinstance(image, dict):
        try:
            return Image.open(io.BytesIO(image["bytes"]))
        except UnidentifiedImageError as error:
            raise ValueError("its stored bytes are not an image Pillow can read") from error
        except Image.DecompressionBombError as error:
            raise ValueError(f"its stored image is too large to decode: {error}") from error
    return image


def prompt_and_answer(conversation: Conversation) -> tuple[Sequence[dict], str]:
    """The messages before a conversation's last assistant turn, and that turn's text (the reference answer)."""
    last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
    return conversation.messages[:last + 1], conversation.messages[last]["content"].strip()
