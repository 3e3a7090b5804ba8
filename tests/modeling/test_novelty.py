"""The router's novelty guard: local outlier scores, κ from the training split, batch independence, errors."""

import pytest
import torch

from visor.modeling.novelty import NoveltyGuard


def _two_clusters(seed: int = 0) -> torch.Tensor:
    """A tight cluster (spread 0.1) and a wide one (spread 3), 200 points each, in 8 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    tight = 0.1 * torch.randn(200, 8, generator=generator)
    wide = 30.0 + 3.0 * torch.randn(200, 8, generator=generator)
    return torch.cat([tight, wide])


class Fitted:
    """A guard fitted on the two clusters, with its κ (which a model keeps in its config)."""

    def __init__(self, quantile: float = 0.98):
        self.guard = NoveltyGuard(8, 0)
        self.threshold = self.guard.fit(_two_clusters(), quantile)

    def novel(self, features):
        return self.guard.novel(features, self.threshold)

    def scores(self, features):
        return self.guard.scores(features)


def _fitted(quantile: float = 0.98) -> Fitted:
    return Fitted(quantile)


def test_inputs_like_the_training_split_pass_and_far_ones_are_flagged():
    guard = _fitted()
    like = _two_clusters(seed=1)  # fresh samples of the same distribution
    assert guard.novel(like).float().mean() < 0.06  # about the 2% false-alarm rate κ was set for
    far = torch.full((1, 8), -50.0)
    assert guard.novel(far).tolist() == [True]


def test_novelty_is_local_to_each_neighbourhood():
    """A distance normal inside the wide cluster is an outlier next to the tight one: a global threshold cannot
    tell, the local outlier factor can."""
    guard = _fitted()
    step = torch.zeros(1, 8)
    step[0, 0] = 3.0  # 3 units: 30 spreads from the tight cluster, one spread from the wide one
    assert guard.novel(step).tolist() == [True]
    assert guard.novel(step + 30.0).tolist() == [False]


def test_threshold_is_the_quantile_of_leave_one_out_scores():
    loose, strict = _fitted(0.5), _fitted(0.99)
    assert loose.threshold < strict.threshold
    assert 0.35 < loose.novel(_two_clusters(seed=1)).float().mean() < 0.65  # about half of fresh samples (0.46)
    flagged = loose.novel(_two_clusters()).float().mean()  # the training points themselves, each scored with itself
    assert flagged < 0.5  # included: lower scores than leave-one-out, so fewer than half are flagged


def test_scores_do_not_depend_on_the_batch():
    guard = _fitted()
    inputs = _two_clusters(seed=2)[::37]
    alone = torch.cat([guard.scores(row[None]) for row in inputs])
    assert torch.equal(guard.scores(inputs), alone)


def test_duplicated_training_features_give_finite_scores():
    features = torch.cat([torch.zeros(20, 4), torch.randn(40, 4)])
    guard = NoveltyGuard(4, 0)
    threshold = guard.fit(features)
    assert torch.isfinite(guard.scores(torch.zeros(3, 4))).all() and torch.isfinite(torch.tensor(threshold))


def test_unfitted_guard_flags_nothing_and_large_tables_are_subsampled():
    guard = NoveltyGuard(8, 0)
    assert guard.novel(torch.randn(3, 8), None).tolist() == [False] * 3
    guard.fit(_two_clusters(), max_references=100)
    assert guard.references.shape == (100, 8) and guard.radii.shape == (100,)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one neighbour"):
        NoveltyGuard(8, 0, neighbours=0)
    with pytest.raises(ValueError, match="more references than neighbours"):
        NoveltyGuard(8, 5, neighbours=5)
    with pytest.raises(ValueError, match="quantile must lie in"):
        NoveltyGuard(8, 0).fit(_two_clusters(), quantile=0.0)
    with pytest.raises(ValueError, match="more than 5 training samples"):
        NoveltyGuard(8, 0).fit(torch.randn(5, 8))
