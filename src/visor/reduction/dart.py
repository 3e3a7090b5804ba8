"""DART (Wen et al., EMNLP 2025): after layer K keep the visual tokens least like a few pivot tokens (duplicates go).

"Duplication matters more than importance": no attention weights are read, so it works with any attention kernel.
Layer K-1's cached keys pick the pivots, the tokens of largest key norm (all heads together): `image_pivots`
visual tokens and `text_pivots` text tokens after the image (the question). Then each pivot in turn (visual
pivots first, each kind by norm) claims its share of the budget among the visual tokens not yet kept: the ones
whose states (layer K-1's output) are least similar to it by cosine. The visual pivots are kept too; the budget is
each sample's kept fraction of its visual tokens, exactly (the pivots' share included), so a `keep` costs here
what it costs FastV. Tokens are kept in their places (positions unchanged); layers K.. run on them and all text.

Scores come out as the order tokens were claimed in, so the pruning machinery's top-k keeps exactly the claimed
set. The similarities are one (B, n, d) × (B, d, 1) product per pivot, counted in the FLOPs
(`scoring_row_flops`: 2 · tokens · width per pivot); the norms are element-wise.

Reference vs paper (ZichenWen1/DART): the paper selects pivots by key norm at K = 2 (LLaVA-1.5) with 8 pivots
(4 visual + 4 text) and keeps the least duplicated tokens per pivot. The reference ranks only sample 0, keeps
int(n · keep / 8) tokens per pivot plus the 4 visual pivots (so slightly more than the budget, and fewer where
the division rounds down), walks the pivots in the order of a Python set (so the result can depend on hashing),
takes the L1 norm of the cached keys, and compares states after the language model's *final* norm. The cached
keys carry RoPE, and an L1 norm changes with a token's position, so left padding in a batch would change the
pivots: here the L2 norm, which RoPE (a rotation of feature pairs) leaves unchanged, so a sample is reduced as
alone. A plan is built from the config alone, so the states are compared as layer K-1 outputs them (per-token
scale does not change a cosine; the final norm's per-channel weights would). Text pivots are the question tokens
after the image in both.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from visor.backbones import backbone_for
from visor.reduction.pruned import PruningPlan, Tokens, check_keep, check_layer, kept_count, pruned

PIVOTS = 4  # visual and text pivots each, as the paper's default


def _top_by(values: torch.Tensor, candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, count) slots of the `count` largest `values` among `candidates`, largest first, and whether each exists."""
    count = min(count, values.shape[1])
    top = values.masked_fill(~candidates, float("-inf")).topk(count, dim=1)
    return top.indices, top.values > float("-inf")


def question_tokens(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: each sample's text tokens after its last visual token, where the text pivots come from."""
    slots = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
    last_visual = torch.where(visual & valid, slots, -1).max(dim=1, keepdim=True).values
    return valid & ~visual & (slots > last_visual)


def claimed_order(keys: torch.Tensor, states: torch.Tensor, tokens: Tokens, keep: float,
                  image_pivots: int = PIVOTS, text_pivots: int = PIVOTS) -> torch.Tensor:
    """(B, n) DART's choice as scores: kept visual tokens score by the order they were claimed in (pivots first,
    highest), every other slot 0. `keys` (B, H_kv, n, head_dim), `states` (B, n, d): layer K-1's."""
    visual = tokens.visual & tokens.valid
    norms = keys.transpose(1, 2).flatten(2).norm(dim=-1)  # L2 over all heads' key features: RoPE leaves it alone
    question = question_tokens(tokens.visual, tokens.valid)
    budget = kept_count(visual.sum(dim=1), keep)
    visual_slots, visual_exists = _top_by(norms, visual, image_pivots)
    visual_exists &= torch.arange(visual_slots.shape[1], device=visual.device) < budget[:, None]
    text_slots, text_exists = _top_by(norms, question, text_pivots)
    pivots = torch.cat([visual_slots, text_slots], dim=1)
    exists = torch.cat([visual_exists, text_exists], dim=1)
    rows = torch.arange(len(visual), device=visual.device)[:, None]
    order = torch.zeros(visual.shape, dtype=torch.float64, device=visual.device)
    claimed = torch.zeros_like(visual)
    claimed[rows, visual_slots] = visual_exists
    order[rows, visual_slots] = torch.where(visual_exists, 2.0 + 1.0 / (1 + torch.arange(
        visual_slots.shape[1], device=visual.device)), 0.0).double()
    # The budget left after the visual pivots, split over the pivots (the first ones take the remainder).
    left = budget - visual_exists.sum(dim=1)
    count = exists.sum(dim=1).clamp(min=1)
    position = exists.long().cumsum(dim=1) - 1
    share = torch.where(exists, left[:, None] // count[:, None] + (position < (left % count)[:, None]), 0)
    normalised = functional.normalize(states.float(), dim=-1)
    for index in range(pivots.shape[1]):
        if not bool(exists[:, index].any()):  # no sample has this pivot (a short question): nothing to compare
            continue
        pivot = normalised[rows[:, 0], pivots[:, index]]  # (B, d)
        similarity = (normalised @ pivot[:, :, None])[..., 0]  # (B, n)
        open_ = visual & ~claimed
        rank = similarity.masked_fill(~open_, float("inf")).argsort(dim=1, stable=True).argsort(dim=1)
        takes = open_ & (rank < share[:, index:index + 1])
        order = torch.where(takes, 1.0 + (1.0 - rank.double() / (tokens.width + 1)) / (index + 2), order)
        claimed |= takes
    return order


def dart_plan(config, layer: int = 2, keep: float = 0.5, image_pivots: int = PIVOTS,
              text_pivots: int = PIVOTS) -> PruningPlan:
    check_keep(keep)
    check_layer(layer, config.text_config.num_hidden_layers)
    if image_pivots < 1 or text_pivots < 0:
        raise ValueError(f"DART needs at least one visual pivot and no negative count of text pivots, got "
                         f"{image_pivots} and {text_pivots}")

    def scorer(layer, layer_input, rope, keys, tokens: Tokens, layer_output) -> torch.Tensor:
        return claimed_order(keys, layer_output, tokens, keep, image_pivots, text_pivots)

    def pivots(config, inputs: dict) -> torch.Tensor:
        """(B,) pivots per sample: each is one similarity row (text pivots need question tokens after the image)."""
        ids = inputs["input_ids"]
        valid = torch.ones_like(ids, dtype=torch.bool) if inputs.get("attention_mask") is None \
            else inputs["attention_mask"].bool()
        visual = backbone_for(config).visual_token_mask(ids) & valid
        budget = kept_count(visual.sum(dim=1), keep)
        return budget.clamp(max=image_pivots) + question_tokens(visual, valid).sum(dim=1).clamp(max=text_pivots)

    return PruningPlan({layer: keep}, scorer, scoring_rows=pivots,
                       scoring_row_flops=lambda config, tokens: 2 * tokens * config.text_config.hidden_size,
                       name="dart", details=dict(layer=layer, keep=keep, image_pivots=image_pivots,
                                                 text_pivots=text_pivots))


def dart(model, layer: int = 2, keep: float = 0.5, image_pivots: int = PIVOTS, text_pivots: int = PIVOTS):
    """`model` (a stock model) keeping `keep` of each sample's visual tokens from layer `layer` on, by DART."""
    return pruned(model, dart_plan(model.config, layer, keep, image_pivots, text_pivots))
