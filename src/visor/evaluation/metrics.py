"""Answer metrics: exact match, ANLS (DocVQA) and relaxed accuracy (ChartQA).

Each metric scores one prediction against one or more reference answers (the best reference counts) and returns
a float in [0, 1]; `mean_score` averages a metric over a data set.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

References = str | Sequence[str]


def normalize(text: str) -> str:
    """Lower case, punctuation dropped (decimal points kept), articles dropped, whitespace collapsed (VQA-style)."""
    text = text.lower()
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # a period that is not a decimal point
    text = "".join(" " if ch in string.punctuation and ch != "." else ch for ch in text)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def exact_match(prediction: str, references: References) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    return float(any(normalize(prediction) == normalize(ref) for ref in _listed(references)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA, ST-VQA): max over references of
    1 - NL, where NL = edit distance / longer length on lower-cased, whitespace-trimmed strings, and 0 when
    NL >= threshold (0.5: a reading that is mostly wrong scores nothing)."""
    best = 0.0
    pred = " ".join(prediction.lower().split())
    for ref in _listed(references):
        ref = " ".join(ref.lower().split())
        length = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / length if length else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    """A number from text as ChartQA reads it: "12", "3.5", "40%" (= 0.4); None when it is not a number."""
    text = text.strip()
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: References, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed correctness: numbers within `tolerance` relative error of a non-zero reference count as
    correct; anything else (text, or a reference of 0) needs a case-insensitive exact match."""
    for ref in _listed(references):
        pred_value, ref_value = _to_float(prediction), _to_float(ref)
        if pred_value is not None and ref_value:
            correct = abs(pred_value - ref_value) / abs(ref_value) <= tolerance
        else:
            correct = prediction.strip().lower() == ref.strip().lower()
        if correct:
            return 1.0
    return 0.0


METRICS: dict[str, Callable[[str, References], float]] = {
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}


def mean_score(metric: str | Callable[[str, References], float], predictions: Sequence[str],
               references: Sequence[References]) -> float:
    """Mean of a metric (a name in METRICS or a function) over paired predictions and references."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        metric = METRICS[metric]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(metric(p, r) for p, r in zip(predictions, references)) / len(predictions)


def _listed(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs
