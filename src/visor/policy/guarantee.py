"""A budget with a guarantee: τ chosen so that the policy loses at most ε accuracy against a reference, with
probability at least 1 − δ over the draw of the calibration set.

The loss of a sample at τ is 1 when the reference answers it correctly and the configuration the router picks at
τ does not, else 0. Its mean, the risk R(τ), bounds the accuracy lost: reference accuracy − policy accuracy =
P(reference right, policy wrong) − P(reference wrong, policy right) ≤ R(τ). The reference is the stock full model
when the label table carries its answers (`visor policy label --reference-model`), else the VISOR model's largest
configuration.

Learn then Test with fixed-sequence testing: for each τ, from the most expensive (τ = 1) towards the cheapest,
test "R(τ) > ε" with the exact binomial p-value P(Binomial(n, ε) ≤ k) for k losses among n calibration samples
(the losses are 0 or 1, so no looser bound is needed), and stop at the first τ whose p-value exceeds δ. Testing
in a fixed order needs no correction for the number of thresholds: with probability ≥ 1 − δ no τ with R(τ) > ε is
among the rejected ones, so the cheapest of them on the calibration data is certified. When none is, the policy
runs the largest configuration for every sample (τ = 1) and says so.

The guarantee holds for data exchangeable with the calibration samples (drawn from the same distribution); on
anything else (held-out task variants, another dataset) it does not apply, whatever happens there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from visor.modeling.router import ConfigurationRouter
from visor.policy.calibration import Outcome, sweep
from visor.policy.labels import LabelTable

UNCERTIFIED_THRESHOLD = 1.0  # when no τ is certified: the largest configuration for every sample


@dataclass(frozen=True)
class Guarantee:
    """A calibrated τ and what it is certified for (stored in the model's config as `router_guarantee`)."""

    max_loss: float  # ε: accuracy (a fraction) the policy may lose against the reference
    confidence: float  # 1 − δ: probability, over the calibration set, that the loss stays within ε
    reference: str  # what the loss is measured against
    samples: int  # calibration samples
    certified: bool  # False: no τ passed; τ = 1 (the largest configuration) is used instead
    threshold: float  # τ
    losses: int  # calibration samples the reference answers and the policy at τ does not
    bound: float  # the binomial upper confidence bound (at `confidence`) on the risk at τ

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for `visor generate` and the reports."""
        if not self.certified:
            return (f"no τ is certified to lose at most {in_points(self.max_loss)} against {self.reference} "
                    f"with confidence {self.confidence:g} ({self.samples} calibration samples): the largest "
                    "configuration runs for every input")
        return (f"τ = {self.threshold:.6g} is certified to lose at most {in_points(self.max_loss)} of accuracy "
                f"against {self.reference} with confidence {self.confidence:g} on data like its {self.samples} "
                f"calibration samples ({self.losses} lost there; upper bound {100 * self.bound:.2f} points)")


def guarantee_at(config, threshold: float | None = None) -> Guarantee | None:
    """The guarantee stored in a VISOR model's `config`, when the policy runs at the τ it certifies (`threshold`
    None: the config's own τ); None otherwise, or for a stock model's config."""
    stored = getattr(config, "router_guarantee", None)
    if stored is None or threshold not in (None, stored["threshold"]):
        return None
    return Guarantee(**stored)


def in_points(fraction: float) -> str:
    """An accuracy loss given as a fraction, in points: 0.01 is "1 point"."""
    value = 100 * fraction
    return f"{value:g} point{'' if value == 1 else 's'}"


def check_risk(max_loss: float, confidence: float) -> None:
    for name, value in (("the maximum loss ε", max_loss), ("the confidence 1 − δ", confidence)):
        if isinstance(value, bool) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def binomial_p_value(losses: int, samples: int, max_loss: float) -> float:
    """P(Binomial(samples, max_loss) ≤ losses): how likely this few losses are if the risk were `max_loss`."""
    counts = torch.arange(losses + 1, dtype=torch.float64)
    binomial = torch.distributions.Binomial(samples, probs=torch.tensor(max_loss, dtype=torch.float64))
    return min(float(binomial.log_prob(counts).logsumexp(0).exp()), 1.0)


def upper_bound(losses: int, samples: int, confidence: float) -> float:
    """The Clopper-Pearson upper bound: the largest risk under which `losses` or fewer of `samples` still has
    probability 1 − `confidence` (bisection; the p-value falls as the risk grows)."""
    if losses >= samples:
        return 1.0
    low, high = losses / samples, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if binomial_p_value(losses, samples, middle) > 1 - confidence else (low, middle)
    return high


def minimum_samples(max_loss: float, confidence: float) -> int:
    """The fewest calibration samples that can certify anything: with no loss at all, (1 − ε)^n ≤ δ."""
    check_risk(max_loss, confidence)
    needed = math.ceil(math.log(1 - confidence) / math.log1p(-max_loss))
    while binomial_p_value(0, needed, max_loss) > 1 - confidence:  # rounding in the logarithms
        needed += 1
    return needed


def losses_against_reference(table: LabelTable, outcome: Outcome) -> torch.Tensor:
    """(N,) bool: the samples the reference answers correctly and `outcome` does not."""
    return table.reference_correct & ~outcome.correct


def realised(table: LabelTable, outcome: Outcome) -> dict:
    """What `outcome` lost against `table`'s reference: the loss (the share of samples the reference answers and
    the policy does not), the two accuracies (%) and their difference in points."""
    reference = 100.0 * float(table.reference_correct.float().mean())
    return dict(samples=len(table), loss=float(losses_against_reference(table, outcome).float().mean()),
                reference_accuracy=reference, accuracy=outcome.accuracy, accuracy_drop=reference - outcome.accuracy)


def check_samples(samples: int, max_loss: float, confidence: float) -> None:
    needed = minimum_samples(max_loss, confidence)
    if samples < needed:
        raise ValueError(f"{samples} calibration samples cannot certify a loss of at most {max_loss:g} with confidence "
                         f"{confidence:g} even if the policy lost none: that takes at least {needed} samples")


def fixed_sequence_test(points: list[tuple[float, Outcome]], reference_correct: torch.Tensor, max_loss: float,
                        confidence: float, reference: str) -> tuple[Guarantee, Outcome]:
    """The certified τ among `points` ((τ, outcome) for one calibration set; see the module's docstring)."""
    samples = len(reference_correct)
    check_samples(samples, max_loss, confidence)
    expensive_first = sorted(points, key=lambda point: -point[0])
    if expensive_first[0][0] != UNCERTIFIED_THRESHOLD:
        raise ValueError(f"the thresholds tried must include τ = {UNCERTIFIED_THRESHOLD:g}, the fallback")
    passed = []
    for threshold, outcome in expensive_first:
        losses = int((reference_correct & ~outcome.correct).sum())
        if binomial_p_value(losses, samples, max_loss) > 1 - confidence:
            break
        passed.append((threshold, outcome, losses))
    certified = bool(passed)
    if certified:
        threshold, outcome, losses = min(passed, key=lambda item: (item[1].mean_flops, -item[1].accuracy))
    else:
        threshold, outcome = expensive_first[0]
        losses = int((reference_correct & ~outcome.correct).sum())
    guarantee = Guarantee(max_loss=float(max_loss), confidence=float(confidence), reference=reference,
                          samples=samples, certified=certified, threshold=threshold, losses=losses,
                          bound=upper_bound(losses, samples, confidence))
    return guarantee, outcome


def certify(router: ConfigurationRouter, table: LabelTable, router_flops: int, max_loss: float,
            confidence: float) -> tuple[Guarantee, Outcome]:
    """τ for "lose at most `max_loss` accuracy (a fraction) against the table's reference, with probability at least
    `confidence`", on the calibration `table`; and the router's outcome there."""
    check_samples(len(table), max_loss, confidence)  # before sweeping
    return fixed_sequence_test(sweep(router, table, router_flops), table.reference_correct, max_loss, confidence,
                               table.reference_name)
