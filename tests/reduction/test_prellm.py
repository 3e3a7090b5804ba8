"""Every pre-LLM reduction hands the language model a well-formed image block, and counts what it hands over.

Well-formed: each image keeps its `image_newline` tokens (one per hi-res row it sends: every row for the
methods that select tokens, every pooled row for pooling); a selecting method's kept tokens are the packed
tokens themselves in their packed order, newlines in their places. Counted: the tokens of each image that the
FLOP count uses are the tokens the model receives.
"""

from __future__ import annotations

import pytest
import torch

from visor import VisorForConditionalGeneration, presets
from visor.reduction import PreLLMReduced
from visor.backbones import backbone_for
from visor.backbones.llava_onevision import PackedGrid
from visor.reduction.hired import HiRED
from visor.reduction.pool import Pooling
from visor.reduction.visionzip import VisionZip

IMAGE = presets.TINY_IMAGE_TOKEN_ID
SIZES = [(64, 64), (64, 128), (128, 64), (128, 128), (50, 120)]
NEWLINE = 1000.0  # a newline embedding no projected grid token comes near
REDUCERS = [VisionZip(0.05), VisionZip(0.3), VisionZip(0.8), HiRED(0.03), HiRED(0.3), HiRED(0.8),
            Pooling(1.5), Pooling(2), Pooling(4)]


@pytest.fixture(scope="module")
def marked(stock_factory):
    """A stock model whose `image_newline` is recognisable among the projected tokens."""
    model = stock_factory("tiny", num_layers=2)
    with torch.no_grad():
        model.model.image_newline.fill_(NEWLINE)
    return model


@pytest.fixture(scope="module")
def images(marked, batch_factory):
    return batch_factory(marked, image_sizes=SIZES)


def is_newline(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens == NEWLINE).all(dim=-1)


def expected_rows(reducer, config, size) -> int:
    rows = backbone_for(config).packed_grid(size).hires[0]
    return reducer.pooled(rows) if isinstance(reducer, Pooling) else rows


def contextual_tokens(reducer, config, size) -> int:
    if not isinstance(reducer, VisionZip):
        return 0
    grid = backbone_for(config).packed_grid(size)
    return reducer.budget(grid.num_tokens - grid.hires[0])[1]


@torch.no_grad()
@pytest.mark.parametrize("reducer", REDUCERS, ids=repr)
def test_every_image_keeps_its_newlines_in_order(marked, images, reducer):
    pixel_values, sizes = images["pixel_values"], images["image_sizes"]
    packed = marked.model.get_image_features(pixel_values, sizes, return_dict=True).pooler_output
    reduced = reducer.features(marked, pixel_values, sizes)
    for size, full, image in zip(sizes.tolist(), packed, reduced):
        newlines = is_newline(image)
        assert int(newlines.sum()) == expected_rows(reducer, marked.config, size)
        if isinstance(reducer, Pooling):  # a newline closes every pooled row, as the model packs its own rows
            grid = backbone_for(marked.config).packed_grid(size)
            pooled = PackedGrid(tuple(map(reducer.pooled, grid.base)), tuple(map(reducer.pooled, grid.hires)))
            assert torch.equal(newlines, pooled.newlines())
            continue
        # Selected tokens (before VisionZip's contextual ones) are packed tokens, in packed order.
        selected = image[: len(image) - contextual_tokens(reducer, marked.config, size)]
        assert is_newline(selected).sum() == newlines.sum()
        match = (selected[:, None] == full[None]).all(dim=-1)  # (kept, packed)
        assert match.any(dim=1).all()
        grid_positions = match[~is_newline(selected)].float().argmax(dim=1)
        assert torch.equal(grid_positions, grid_positions.sort().values)
        positions = torch.where(is_newline(selected), -1, 0)
        positions[~is_newline(selected)] = grid_positions
        # Newline k of the output sits after the grid tokens of rows < k+1 and before those of later rows.
        row_end = is_newline(full).nonzero().squeeze(1)
        for k, slot in enumerate(is_newline(selected).nonzero().squeeze(1).tolist()):
            assert (positions[:slot][positions[:slot] >= 0] < row_end[k]).all()
            assert (positions[slot:][positions[slot:] >= 0] > row_end[k]).all()


@torch.no_grad()
@pytest.mark.parametrize("reducer", REDUCERS, ids=repr)
@pytest.mark.parametrize("visor", [False, True], ids=["stock", "visor"])
def test_counted_tokens_are_the_tokens_the_model_receives(marked, images, reducer, visor):
    base = VisorForConditionalGeneration.from_stock(marked).eval() if visor else marked
    reduced = PreLLMReduced(base, reducer)
    inputs = reduced.model_inputs(images["input_ids"], images["attention_mask"], images["pixel_values"],
                                  images["image_sizes"])
    counted = reduced.visual_tokens(images)
    text = ((images["input_ids"] != IMAGE) & images["attention_mask"].bool()).sum(dim=1)
    assert torch.equal(inputs["attention_mask"].sum(dim=1), text + counted)
    if visor:
        assert torch.equal((inputs["input_ids"] == IMAGE).sum(dim=1), counted)
        assert [len(image) for image in inputs["image_features"]] == counted.tolist()
    else:
        received = is_newline(inputs["inputs_embeds"]).sum(dim=1)
        rows = torch.tensor([expected_rows(reducer, marked.config, size) for size in images["image_sizes"].tolist()])
        assert torch.equal(received, rows)
