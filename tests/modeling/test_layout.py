"""`TokenLayout`: streams split and merge losslessly, and every mask follows the original token order."""

from __future__ import annotations

import pytest
import torch

from visor.modeling.layout import TokenLayout, attention_bias


@pytest.fixture
def layout_case():
    """Three rows: left padding, an image in the middle, an image first, and a row with two images."""
    visual = torch.tensor([
        [0, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 1, 1, 0, 0],
    ], dtype=torch.bool)
    attention_mask = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ])
    return visual, attention_mask, TokenLayout.build(visual, attention_mask)


def test_split_then_merge_is_the_identity(layout_case):
    _, _, layout = layout_case
    sequence = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    visual, text = layout.split(sequence)
    assert visual.shape == (3, 4, 5) and text.shape == (3, 6, 5)
    assert torch.equal(layout.merge(visual, text), sequence)


def test_streams_keep_the_original_order(layout_case):
    visual_mask, attention_mask, layout = layout_case
    for row in range(3):
        visual_positions = visual_mask[row].nonzero().squeeze(1)
        text_positions = (~visual_mask[row]).nonzero().squeeze(1)
        assert layout.visual.index[row, : len(visual_positions)].tolist() == visual_positions.tolist()
        assert layout.text.index[row, : len(text_positions)].tolist() == text_positions.tolist()
        # Empty slots point at the dummy column S and are invalid.
        assert (layout.visual.index[row, len(visual_positions):] == 8).all()
        assert not layout.visual.valid[row, len(visual_positions):].any()
    # Padding is text but never valid.
    assert layout.text.valid[0].tolist() == [False, False, True, True, True, False]
    assert layout.visual.width == 4


def _reference_full_mask(attention_mask):
    length = attention_mask.shape[1]
    causal = torch.ones(length, length).tril().bool()
    return (causal[None] & attention_mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]


def test_full_mask_is_causal_plus_padding(layout_case):
    _, attention_mask, layout = layout_case
    assert torch.equal(layout.full_mask(), _reference_full_mask(attention_mask))


def test_text_mask_is_the_full_mask_restricted_to_text(layout_case):
    visual_mask, attention_mask, layout = layout_case
    full = _reference_full_mask(attention_mask)
    text_mask = layout.text_mask()
    for row in range(3):
        positions = (~visual_mask[row]).nonzero().squeeze(1)
        count = len(positions)
        assert torch.equal(text_mask[row, :count, :count], full[row][positions][:, positions])


def test_cross_mask_lets_text_read_only_earlier_valid_visual_tokens(layout_case):
    visual_mask, attention_mask, layout = layout_case
    cross = layout.cross_mask()
    for row in range(3):
        text_positions = (~visual_mask[row]).nonzero().squeeze(1).tolist()
        visual_positions = visual_mask[row].nonzero().squeeze(1).tolist()
        for i, t in enumerate(text_positions):
            for j, v in enumerate(visual_positions):
                assert bool(cross[row, i, j]) == (v < t), (row, t, v)
        assert not cross[row, :, len(visual_positions):].any()
    # Row 2: text at position 0 comes before both images and reads nothing; position 3 reads only the first image.
    assert not cross[2, 0].any()
    assert cross[2, 1].tolist() == [True, True, False, False]


def test_select_takes_rows_of_every_map(layout_case):
    _, _, layout = layout_case
    rows = torch.tensor([2, 0])
    chosen = layout.select(rows)
    sequence = torch.randn(3, 8, 2)
    visual, text = chosen.split(sequence[rows])
    assert torch.equal(visual, layout.split(sequence)[0][rows])
    assert torch.equal(chosen.merge(visual, text), sequence[rows])
    assert torch.equal(chosen.cross_mask(), layout.cross_mask()[rows])


def test_layout_without_visual_tokens():
    layout = TokenLayout.build(torch.zeros(2, 4, dtype=torch.bool), None)
    sequence = torch.randn(2, 4, 3)
    visual, text = layout.split(sequence)
    assert visual.shape == (2, 0, 3) and torch.equal(text, sequence)
    assert layout.cross_mask().shape == (2, 4, 0)
    assert torch.equal(layout.merge(visual, text), sequence)


def test_attention_bias_is_zero_where_allowed_and_dtype_min_elsewhere():
    allowed = torch.tensor([[[True, False], [True, True]]])
    bias = attention_bias(allowed, torch.float32)
    assert bias.shape == (1, 1, 2, 2)
    assert bias[0, 0].tolist() == [[0.0, torch.finfo(torch.float32).min], [0.0, 0.0]]
