"""What a policy buys on a label table, and choosing τ for a budget.

The router's inputs are stored in the table, so its decision for every sample and τ is exact without running
the model again (the model's `configuration="auto"` makes the same decision from the same features). One
trained router serves every budget: `calibrate` picks τ on held-out data for a target mean LLM-prefill FLOPs
or a target accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visor.modeling.router import ConfigurationRouter
from visor.policy.labels import LabelTable

THRESHOLDS = tuple(i / 100 for i in range(101))
MAX_SCORE_THRESHOLDS = 2000  # beyond this many distinct scores, the sweep tries evenly spaced ones among them


@dataclass
class Outcome:
    """Choices and their consequences for every sample of a table."""

    choice: torch.Tensor  # (N,) configuration index
    correct: torch.Tensor  # (N,) bool
    flops: torch.Tensor  # (N,) LLM prefill FLOPs incl. the router's own
    novel: torch.Tensor | None = None  # (N,) bool: samples the router's novelty guard flagged (routed outcomes)

    @property
    def accuracy(self) -> float:
        return 100.0 * float(self.correct.float().mean()) if len(self.correct) else float("nan")

    @property
    def mean_flops(self) -> float:
        return float(self.flops.double().mean()) if len(self.flops) else float("nan")


def fixed_outcome(table: LabelTable, configuration: int) -> Outcome:
    rows = torch.arange(len(table))
    choice = torch.full((len(table),), configuration, dtype=torch.long)
    return Outcome(choice, table.correct[rows, choice], table.flops[rows, choice])


@torch.no_grad()
def _router_inputs(router: ConfigurationRouter, table: LabelTable) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's logits and its novelty guard's flags for every sample (neither depends on τ)."""
    features = table.features.to(router.norm.weight.device, router.norm.weight.dtype)
    return router(features).cpu(), router.novel(features).cpu()


def _chosen(table: LabelTable, choice: torch.Tensor, router_flops: int, novel: torch.Tensor) -> Outcome:
    rows = torch.arange(len(table))
    return Outcome(choice, table.correct[rows, choice], table.flops[rows, choice] + router_flops, novel)


def router_outcome(router: ConfigurationRouter, table: LabelTable, threshold: float, router_flops: int) -> Outcome:
    logits, novel = _router_inputs(router, table)
    return _chosen(table, router.decide(logits, threshold, novel), router_flops, novel)


def oracle_outcome(table: LabelTable) -> Outcome:
    """The best per-sample choice in hindsight: the cheapest correct configuration (the cheapest if none is)."""
    ordered = table.correct.clone()
    any_correct = ordered.any(dim=1)
    ordered[~any_correct, 0] = True
    choice = ordered.float().argmax(dim=1)
    rows = torch.arange(len(table))
    return Outcome(choice, table.correct[rows, choice], table.flops[rows, choice])


def sweep(router: ConfigurationRouter, table: LabelTable, router_flops: int,
          thresholds=None) -> list[tuple[float, Outcome]]:
    """The router's outcome at each τ: by default the 0.01 grid plus the table's own scores, since a decision
    changes only where τ crosses one (every score for tables with up to `MAX_SCORE_THRESHOLDS` of them, evenly
    spaced ones among them beyond, so the cost stays linear in the table). A grid alone cannot tell apart
    routers that are sure (scores of 0.999 and more), which the cheap configuration's frequent "good" labels
    produce."""
    logits, novel = _router_inputs(router, table)
    if thresholds is None:
        scores = router.decision_scores(logits).clamp(0, 1).flatten().unique()  # sorted
        if len(scores) > MAX_SCORE_THRESHOLDS:
            scores = scores[torch.linspace(0, len(scores) - 1, MAX_SCORE_THRESHOLDS).round().long()]
        thresholds = sorted(set(THRESHOLDS) | set(scores.tolist()))
    return [(threshold, _chosen(table, router.decide(logits, threshold, novel), router_flops, novel))
            for threshold in thresholds]


def calibrate(router: ConfigurationRouter, table: LabelTable, router_flops: int,
              target_flops: float | None = None, target_accuracy: float | None = None,
              best_if_unreachable: bool = False) -> tuple[float, Outcome]:
    """τ for a budget: the most accurate τ within `target_flops` (mean), or the cheapest reaching `target_accuracy`
    (an unreachable accuracy is an error, or with `best_if_unreachable` means the router's best accuracy)."""
    if (target_flops is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_flops and target_accuracy")
    points = sweep(router, table, router_flops)
    if target_flops is not None:
        feasible = [(t, o) for t, o in points if o.mean_flops <= target_flops]
        if not feasible:
            cheapest = min(o.mean_flops for _, o in points)
            raise ValueError(f"target of {target_flops:.4g} FLOPs is below what the router can reach "
                             f"(cheapest τ gives {cheapest:.4g})")
        return max(feasible, key=lambda point: (point[1].accuracy, -point[1].mean_flops))
    if not 0.0 <= target_accuracy <= 100.0:
        raise ValueError(f"target accuracy is a percentage in [0, 100], got {target_accuracy}")
    best = max(o.accuracy for _, o in points)
    if best_if_unreachable:
        target_accuracy = min(target_accuracy, best)
    feasible = [(t, o) for t, o in points if o.accuracy >= target_accuracy]
    if not feasible:
        raise ValueError(f"target accuracy {target_accuracy:.1f}% is above what the router reaches (best {best:.1f}%)")
    return min(feasible, key=lambda point: (point[1].mean_flops, -point[1].accuracy))
