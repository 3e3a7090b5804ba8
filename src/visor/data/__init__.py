"""Data: the offline synthetic task suite, tokenizers, the processor, and adapters (easy-VQA, `datasets`).

Flow: `make_sample` / `generate_split` give `Sample`s (PIL image, question, answer, task, group, per-pixel
class map); `VisorProcessor(config, tokenizer)` turns them into model inputs, with `patch_targets` aligned
to the anyres crops when class maps are passed.
"""

from visor.data.crops import CropLayout
from visor.data.processor import VisorProcessor, load_image
from visor.data.render import IGNORE_INDEX, PATCH_CLASSES
from visor.data.tasks import (
    DEFAULT_SIZE, GROUPS, SPLITS, TASKS, Sample, Task, generate_split, get_task, make_sample, sample_seed, task_names,
)
from visor.data.tokenizer import build_tokenizer, smollm2_tokenizer, suite_vocabulary

__all__ = [
    "CropLayout", "VisorProcessor", "load_image", "IGNORE_INDEX", "PATCH_CLASSES", "DEFAULT_SIZE", "GROUPS",
    "SPLITS", "TASKS", "Sample", "Task", "generate_split", "get_task", "make_sample", "sample_seed", "task_names",
    "build_tokenizer", "smollm2_tokenizer", "suite_vocabulary",
]
