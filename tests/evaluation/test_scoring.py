"""The one scorer: exact match per sample with its FLOPs and configuration, accuracy per task, teacher forcing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from visor.evaluation.scoring import Scores, score, teacher_forced


class Words:
    """A data source whose token ids are the answer words' indices."""

    vocabulary = ["no", "yes", "red", "blue"]

    def decode(self, tokens):
        return " ".join(self.vocabulary[token] for token in tokens)


def batch(tasks, answers):
    return SimpleNamespace(tasks=tasks, answers=answers, inputs={"input_ids": torch.zeros(len(tasks), 1)})


def test_score_keeps_each_samples_outcome_cost_and_configuration():
    batches = [batch(["colour", "yes_no"], ["red", "yes"]), batch(["colour"], ["blue"])]
    answers = iter([torch.tensor([[2], [0]]), torch.tensor([[3]])])
    flops = iter([torch.tensor([10, 20]), torch.tensor([30])])

    def generate(inputs):
        return next(answers), next(flops), torch.zeros(len(inputs["input_ids"]), dtype=torch.long)

    scores = score(Words(), batches, generate)
    assert scores == Scores(["colour", "yes_no", "colour"], [True, False, True], [10, 20, 30], [0, 0, 0])
    assert scores.accuracy() == {"colour": 100.0, "yes_no": 0.0, "mean": 50.0}
    assert list(scores.accuracy(order=["yes_no", "colour"])) == ["yes_no", "colour", "mean"]


def test_without_costs_the_scores_say_none():
    scores = score(Words(), [batch(["t"], ["no"])], lambda inputs: (torch.tensor([[0]]), None, None))
    assert scores.flops == [None] and scores.configurations == [None] and scores.correct == [True]


def test_teacher_forcing_sums_the_answer_tokens_only():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    log_probability, tokens, greedy = teacher_forced(logits, torch.tensor([[-100, 2, 0]]))
    assert math.isclose(float(log_probability), math.log(0.8) + math.log(0.3), rel_tol=1e-6)
    assert int(tokens) == 2 and not bool(greedy)  # the last target (0) is not the argmax (2)
    _, _, greedy = teacher_forced(logits, torch.tensor([[0, 2, -100]]))
    assert bool(greedy)
