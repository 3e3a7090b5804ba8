"""Metrics against worked examples from their definitions."""

from __future__ import annotations

import pytest

from visor.evaluation.metrics import anls, exact_match, levenshtein, mean_score, normalize, relaxed_accuracy


def test_exact_match_normalises_case_punctuation_and_articles():
    assert exact_match("The Red.", "red") == 1.0
    assert exact_match(" a  circle ", ["square", "Circle"]) == 1.0
    assert exact_match("3.5", "3.5") == 1.0 and exact_match("3.5", "35") == 0.0
    assert exact_match("blue", "red") == 0.0
    assert normalize("It's 3.5 m.") == "it s 3.5 m"


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


def test_anls_worked_examples():
    # ST-VQA / DocVQA: score = 1 - NL when NL < 0.5, else 0; NL = edit distance / longer length, lower-cased.
    assert anls("Helo", "Hello") == pytest.approx(0.8)  # 1 edit / 5
    assert anls("HELLO", "hello") == 1.0
    assert anls("Hello world", "Hello") == 0.0  # 6 / 11 = 0.545 >= 0.5
    assert anls("abcd", "abxy") == 0.0  # exactly 0.5 scores nothing
    assert anls("abcde", "abxde") == pytest.approx(0.8)
    assert anls("tesla", ["telsa motors", "tesla"]) == 1.0  # best reference
    assert anls("", "") == 1.0


def test_relaxed_accuracy_worked_examples():
    # ChartQA: numbers within 5% of a non-zero reference are correct; otherwise exact (case-insensitive) match.
    assert relaxed_accuracy("104", "100") == 1.0
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("106", "100") == 0.0
    assert relaxed_accuracy("0.41", "40%") == 1.0  # 40% = 0.4, 2.5% off
    assert relaxed_accuracy("0.01", "0") == 0.0 and relaxed_accuracy("0", "0") == 1.0  # reference 0: exact
    assert relaxed_accuracy("Yes", "yes") == 1.0 and relaxed_accuracy("yes", "no") == 0.0


def test_mean_score_and_errors():
    assert mean_score("exact_match", ["red", "blue"], ["red", "green"]) == 0.5
    assert mean_score(anls, ["Helo"], [["Hello"]]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown metric"):
        mean_score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        mean_score("anls", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        exact_match("a", [])
