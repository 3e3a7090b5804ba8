"""Linear CKA on cases with known answers."""

from __future__ import annotations

import pytest
import torch

from visor.analysis.cka import cka_matrix, layer_drift, linear_cka


@pytest.fixture
def x():
    return torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_identical_inputs_give_one(x):
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_independent_random_inputs_give_near_zero():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(4000, 8, generator=generator), torch.randn(4000, 8, generator=generator)
    assert linear_cka(a, b) < 0.01


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(x):
    generator = torch.Generator().manual_seed(2)
    y = torch.tanh(x @ torch.randn(16, 16, generator=generator, dtype=torch.float64))  # different but related
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    reference = linear_cka(x, y)
    assert 0.1 < reference < 0.99
    assert linear_cka(x @ rotation, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 7.5 * y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 7.5 * y @ rotation.T) == pytest.approx(reference, abs=1e-10)


def test_not_invariant_to_anisotropic_scaling(x):
    """The check above would pass for a constant function; this one would not."""
    scale = torch.ones(16, dtype=torch.float64)
    scale[0] = 50.0
    assert linear_cka(x, x * scale) < 0.5


def test_matrix_matches_pairwise_and_different_widths_work(x):
    generator = torch.Generator().manual_seed(3)
    states = torch.stack([x, x @ torch.randn(16, 16, generator=generator, dtype=torch.float64),
                          torch.randn(500, 16, generator=generator, dtype=torch.float64)])
    matrix = cka_matrix(states)
    for i in range(3):
        for j in range(3):
            assert matrix[i, j] == pytest.approx(linear_cka(states[i], states[j]), abs=1e-10)
    assert linear_cka(x, x[:, :4] @ torch.randn(4, 32, generator=generator, dtype=torch.float64)) > 0.0


def test_layer_drift_reads_the_first_off_diagonal():
    assert layer_drift([[1.0, 0.9, 0.5], [0.9, 1.0, 0.7], [0.5, 0.7, 1.0]]) == pytest.approx([0.1, 0.3])
