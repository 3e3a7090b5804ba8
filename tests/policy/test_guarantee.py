"""The budget with a guarantee: the binomial test, fixed-sequence testing over τ, and its violation rate."""

from __future__ import annotations

import math

import pytest
import torch

from visor.policy.calibration import Outcome
from visor.policy.guarantee import (
    Guarantee, binomial_p_value, check_risk, fixed_sequence_test, minimum_samples, upper_bound,
)

EPSILON, DELTA = 0.05, 0.1
SAMPLES, DRAWS = 300, 600
# Noise of a frequency estimated from DRAWS Bernoulli(δ) draws, three standard deviations.
NOISE = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)


def test_the_p_value_is_the_exact_binomial_tail():
    for losses, samples, risk in ((0, 10, 0.2), (3, 50, 0.1), (12, 200, 0.05), (40, 40, 0.5)):
        exact = sum(math.comb(samples, i) * risk ** i * (1 - risk) ** (samples - i) for i in range(losses + 1))
        assert binomial_p_value(losses, samples, risk) == pytest.approx(exact, rel=1e-9)


def test_the_upper_bound_is_where_the_p_value_reaches_delta():
    for losses, samples in ((0, 230), (5, 300), (30, 100)):
        bound = upper_bound(losses, samples, 1 - DELTA)
        assert bound > losses / samples
        assert binomial_p_value(losses, samples, bound) == pytest.approx(DELTA, abs=1e-6)
    assert upper_bound(7, 7, 0.9) == 1.0


def test_the_minimum_sample_count_is_the_first_that_can_pass():
    for max_loss, confidence in ((0.01, 0.9), (0.05, 0.95), (0.1, 0.9)):
        needed = minimum_samples(max_loss, confidence)
        assert binomial_p_value(0, needed, max_loss) <= 1 - confidence < binomial_p_value(0, needed - 1, max_loss)
    assert minimum_samples(0.01, 0.9) == 230  # (0.99)^230 = 0.099 <= 0.1 < 0.99^229


@pytest.mark.parametrize("max_loss, confidence", [(0.0, 0.9), (1.0, 0.9), (-0.1, 0.9), (0.05, 0.0), (0.05, 1.0),
                                                  (0.05, 1.5), (True, 0.9)])
def test_risk_levels_outside_the_open_unit_interval_are_refused(max_loss, confidence):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        check_risk(max_loss, confidence)


def _points(lost: torch.Tensor, thresholds: list[float]) -> list[tuple[float, Outcome]]:
    """(τ, outcome) per column of `lost` (N, T): a lost sample is one the policy gets wrong; cheaper with lower τ."""
    return [(threshold, Outcome(torch.zeros(len(lost), dtype=torch.long), ~lost[:, index],
                                torch.full((len(lost),), 100 + index)))
            for index, threshold in enumerate(thresholds)]


def _violation_rates(risks: list[float], seed: int = 0) -> tuple[float, float]:
    """How often (over DRAWS calibration sets) the certified τ's true risk exceeds ε, for fixed-sequence testing and
    for the naive rule (the cheapest τ whose calibration loss is within ε). `risks[j]` is τ = j / (T − 1)'s true risk;
    the reference answers everything, so a sample is lost exactly where the policy is wrong."""
    generator = torch.Generator().manual_seed(seed)
    thresholds = [index / (len(risks) - 1) for index in range(len(risks))]
    true_risk = torch.tensor(risks)
    tested = naive = 0
    for _ in range(DRAWS):
        uniform = torch.rand(SAMPLES, 1, generator=generator)
        lost = uniform < true_risk  # nested: a sample lost at a τ is lost at every τ of higher risk
        guarantee, _ = fixed_sequence_test(_points(lost, thresholds), torch.ones(SAMPLES, dtype=torch.bool), EPSILON,
                                           1 - DELTA, "the reference")
        tested += float(true_risk[thresholds.index(guarantee.threshold)]) > EPSILON
        within = [index for index in range(len(risks)) if float(lost[:, index].float().mean()) <= EPSILON]
        naive += float(true_risk[min(within)]) > EPSILON
    return tested / DRAWS, naive / DRAWS


def test_the_certified_tau_violates_its_bound_at_most_delta_of_the_time():
    """Cheap thresholds just above ε, where point estimates go wrong: the naive rule violates ε often, the test
    at most δ of the time (up to the simulation's noise)."""
    risks = [0.2, 0.12, 0.08, 0.06, 0.055, 0.052, 0.045, 0.03, 0.01, 0.0]  # τ = 0 (cheapest) ... τ = 1 (largest)
    tested, naive = _violation_rates(risks)
    assert tested <= DELTA + NOISE
    assert naive > 3 * DELTA  # the simulation can tell a guarantee from a point estimate


def test_the_guarantee_holds_where_every_threshold_sits_just_above_epsilon():
    """The hardest case for the test: every τ but the largest a hair above ε (one rejection is one violation)."""
    tested, _ = _violation_rates([EPSILON + 0.002] * 9 + [0.0], seed=1)
    assert tested <= DELTA + NOISE


def test_a_risk_that_rises_again_stops_the_sequence_there():
    """Losses need not fall with τ: fixed-sequence testing stops at the first τ it cannot certify, so cheaper
    thresholds behind it are never certified, even when they look safe."""
    generator = torch.Generator().manual_seed(2)
    uniform = torch.rand(SAMPLES, 1, generator=generator)
    lost = uniform < torch.tensor([0.0, 0.0, 0.3, 0.0, 0.0])  # τ = 0.5 loses 30%, the rest nothing
    guarantee, outcome = fixed_sequence_test(_points(lost, [0.0, 0.25, 0.5, 0.75, 1.0]),
                                             torch.ones(SAMPLES, dtype=torch.bool), EPSILON, 1 - DELTA, "reference")
    assert guarantee.certified and guarantee.threshold == 0.75 and guarantee.losses == 0
    assert outcome.flops[0] == 103


def test_nothing_certified_falls_back_to_the_largest_configuration_and_says_so():
    lost = torch.ones(SAMPLES, 3, dtype=torch.bool)
    lost[: SAMPLES // 2, 2] = False  # even τ = 1 loses half the samples against this reference
    guarantee, _ = fixed_sequence_test(_points(lost, [0.0, 0.5, 1.0]), torch.ones(SAMPLES, dtype=torch.bool),
                                       EPSILON, 1 - DELTA, "the stock model")
    assert not guarantee.certified and guarantee.threshold == 1.0 and guarantee.losses == SAMPLES // 2
    assert "no τ is certified" in guarantee.describe() and "largest configuration runs" in guarantee.describe()
    assert Guarantee(**guarantee.to_dict()) == guarantee


def test_only_samples_the_reference_answers_count_as_lost():
    wrong = torch.ones(SAMPLES, 2, dtype=torch.bool)  # the policy is wrong everywhere at τ = 0 ...
    wrong[:, 1] = False
    reference = torch.zeros(SAMPLES, dtype=torch.bool)  # ... but so is the reference
    guarantee, _ = fixed_sequence_test(_points(wrong, [0.0, 1.0]), reference, EPSILON, 1 - DELTA, "reference")
    assert guarantee.certified and guarantee.threshold == 0.0 and guarantee.losses == 0


def test_a_calibration_set_too_small_to_certify_anything_is_an_error_naming_the_size_needed():
    lost = torch.zeros(40, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"40 calibration samples cannot certify .* at least 45 samples"):
        fixed_sequence_test(_points(lost, [0.0, 1.0]), torch.ones(40, dtype=torch.bool), EPSILON, 1 - DELTA, "r")


def test_losses_read_in_points():
    from visor.policy.guarantee import in_points

    assert (in_points(0.01), in_points(0.02), in_points(0.005)) == ("1 point", "2 points", "0.5 points")
