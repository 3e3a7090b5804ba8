"""Offline conversation data made from easy-VQA's shipped images: a LLaVA-format JSON file with its image folder,
and the same records as a `datasets` folder (transformers chat messages, images stored in the dataset)."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import datasets

from visor.data.easy_vqa import question_records


def fixture_records(images: int = 24, turns: int = 2) -> list[dict]:
    """LLaVA-format records: one per easy-VQA training image, its first `turns` questions as a multi-turn
    conversation (the image placeholder in the first turn), and one record that shows two images."""
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, path in question_records("train"):
        by_image[path].append((question, answer))
    records = []
    for index, (path, pairs) in enumerate(list(by_image.items())[:images]):
        conversation = []
        for turn, (question, answer) in enumerate(pairs[:turns]):
            conversation.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
            conversation.append({"from": "gpt", "value": answer})
        records.append({"id": f"easy-{index}", "image": f"images/{Path(path).name}", "conversations": conversation})
    first, second = records[0]["image"], records[1]["image"]
    records.append({"id": "two-images", "image": [first, second], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nwhat shape is in the image ?"},
        {"from": "gpt", "value": records[0]["conversations"][1]["value"]},
    ]})
    return records


def write_llava_fixture(folder: Path, records: list[dict] | None = None) -> Path:
    """`folder`/data.json and the easy-VQA images it names, copied under `folder` (paths are relative to the
    JSON's folder, the default image root); the JSON's path."""
    records = fixture_records() if records is None else records
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sources = {Path(path).name: path for _, _, path in question_records("train")}
    for record in records:
        names = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        for name in names:
            source = sources.get(Path(name).name)
            if source is not None and not (folder / name).exists():
                shutil.copyfile(source, folder / name)
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_hf_fixture(folder: Path, records: list[dict], image_root: Path) -> Path:
    """The same records as a `datasets` folder: an `images` column and chat `messages` with typed parts."""
    roles = {"human": "user", "gpt": "assistant"}
    rows = {"images": [], "messages": []}
    for record in records:
        names = [record["image"]] if isinstance(record["image"], str) else record["image"]
        rows["images"].append([str(image_root / name) for name in names])
        messages = []
        for turn in record["conversations"]:
            text = turn["value"]
            parts = [{"type": "image", "text": None}] * text.count("<image>\n")
            parts.append({"type": "text", "text": text.replace("<image>\n", "")})
            messages.append({"role": roles[turn["from"]], "content": parts})
        rows["messages"].append(messages)
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
    })
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder
