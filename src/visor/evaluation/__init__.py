"""Evaluation: answer metrics (more to come: runners, reports, plots)."""

from visor.evaluation.metrics import METRICS, anls, exact_match, mean_score, relaxed_accuracy

__all__ = ["METRICS", "anls", "exact_match", "mean_score", "relaxed_accuracy"]
