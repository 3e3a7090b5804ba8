"""EVS-style pruning: the retention rule on hand-built frames, the kept count, the stock features it starts from,
the entry point, errors."""

from __future__ import annotations

import pytest
import torch

from visor.backbones import backbone_for
from visor.reduction import evs
from visor.reduction.evs import EVS


def frames_of(*frames: list[list[float]]) -> torch.Tensor:
    """(F·T + 1, d) video tokens from F frames of T (d,) tokens, then a newline of -1s."""
    grid = torch.tensor(frames, dtype=torch.float).flatten(0, 1)
    return torch.cat([grid, -torch.ones(1, grid.shape[1])])


def test_the_least_similar_later_tokens_stay_in_order():
    first = [[1, 0], [0, 1], [1, 1], [1, -1]]
    second = [[1, 0], [0, 1], [-1, 1], [1, -1]]  # token 2 turned
    third = [[0, 1], [0, 1], [-1, 1], [-1, -1]]  # tokens 0 and 3 turned
    video = frames_of(first, second, third)
    pruned = EVS(0.4).prune_video(video, frames=3)  # of 12 grid tokens, floor(7.2) = 7: frame 1 and three more
    assert torch.equal(pruned, torch.cat([video[:4], video[[6, 8, 11]], video[-1:]]))


def test_ties_keep_the_earlier_token_and_the_first_frame_always_stays():
    static = frames_of(*[[[1, 0], [0, 1], [0, -1]]] * 3)  # every later token's similarity is exactly 1
    assert torch.equal(EVS(0.4).prune_video(static, 3), torch.cat([static[:3], static[3:5], static[-1:]]))
    assert torch.equal(EVS(0.99).prune_video(static, 3), torch.cat([static[:3], static[-1:]]))


@pytest.mark.parametrize(("rate", "frames"), [(0.0, 4), (0.3, 4), (0.5, 3), (0.9, 4), (0.5, 1)])
def test_kept_count_is_the_rule_s(stock, rate, frames):
    tokens = backbone_for(stock.config).frame_tokens()
    expected = max(tokens, int(frames * tokens * (1 - rate))) + 1
    assert EVS(rate).kept_tokens(stock.config, frames) == expected
    video = torch.randn(frames * tokens + 1, 8)
    assert len(EVS(rate).prune_video(video, frames)) == expected


@torch.no_grad()
def test_pruning_starts_from_the_stock_video_features(stock, videos):
    batch, _ = videos
    pixels = batch["pixel_values_videos"]
    tokens = backbone_for(stock.config).frame_tokens()
    stock_features = stock.model.get_video_features(pixels, return_dict=True).pooler_output
    for video, full in zip(EVS(0.6).video_features(stock, pixels), stock_features, strict=True):
        assert torch.equal(video[:tokens], full[:tokens]) and torch.equal(video[-1], full[-1])
        later = (video[tokens:-1, None] == full[None, tokens:-1]).all(dim=-1)  # each kept token is a later one
        assert bool(later.any(dim=1).all())


@torch.no_grad()
def test_entry_point(stock, visor, videos):
    batch, _ = videos
    assert torch.equal(evs(stock, 0.0)(**batch).logits, stock(**batch).logits)
    assert evs(visor, 0.5).configuration == visor.config.largest_configuration
    assert not torch.equal(evs(stock, 0.5)(**batch).logits[:, -1], stock(**batch).logits[:, -1])


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rate(stock, rate):
    with pytest.raises(ValueError, match=r"video pruning rate must be in \[0, 1\)"):
        evs(stock, rate)
