"""The task YAMLs' document functions (referenced as `visor.integrations.lmms_tasks.utils.NAME`).

A document is one row of the parquet file `write_task` makes: our dataset columns (`visor.data.datasets_io`), or
for a video suite the clip's path with the question and answer, plus `choices`, the task's possible answers.
"""

from __future__ import annotations

from visor.evaluation.metrics import exact_match


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_video(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list:
    """The clip's path, as lmms-eval's video tasks give theirs."""
    return [doc["video"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(results[0], doc["answer"])}
