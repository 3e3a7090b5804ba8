"""Samples to and from Hugging Face `datasets`, so users can train and evaluate on their own data in one format.

Columns: `image` (an image feature), `question`, `answer`, `task` (a name) and `group` ("hard" or "easy").
Per-pixel class maps are not stored: they exist only for the synthetic suite, which regenerates them by seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import datasets

from visor.data.processor import load_image
from visor.data.tasks import GROUPS, Sample

COLUMNS = ("image", "question", "answer", "task", "group")


def to_hf_dataset(samples: Iterable[Sample]) -> datasets.Dataset:
    """A `datasets.Dataset` with the columns above."""
    samples = list(samples)
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "task": datasets.Value("string"), "group": datasets.Value("string"),
    })
    columns = {name: [getattr(sample, name) for sample in samples] for name in COLUMNS}
    return datasets.Dataset.from_dict(columns, features=features)


def from_hf_dataset(dataset: datasets.Dataset) -> Iterator[Sample]:
    """Samples from any `datasets.Dataset` with the columns above; a ValueError names missing columns or bad rows."""
    missing = [name for name in COLUMNS if name not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset lacks columns {missing}; it needs {list(COLUMNS)}")
    for index, row in enumerate(dataset):
        if row["group"] not in GROUPS:
            raise ValueError(f"row {index}: group must be one of {GROUPS}, got {row['group']!r}")
        try:
            image = load_image(row["image"])
        except ValueError as error:
            raise ValueError(f"row {index}: {error}") from error
        yield Sample(image, row["question"], row["answer"], row["task"], row["group"])
