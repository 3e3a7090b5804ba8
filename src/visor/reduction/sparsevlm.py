"""SparseVLM (Zhang et al., ICML 2025): text-guided progressive pruning with recycling of pruned tokens.

At each pruning layer the question tokens (text after the image) that look at the image most are the
"raters": a question token rates when its attention mass on visual tokens is at least the mean over the
question. Visual tokens are scored by the raters' attention, averaged over heads and raters, in the layer just
before the pruning layer, and each sample keeps `keep` of its visual tokens still present. Of the dropped
tokens, the best-scored 30% (+1) are recycled: the top int(n / 10) + 1 of them are cluster centres, every other
candidate joins its most similar centre (cosine of hidden states), and each centre's slot carries the mean of
its cluster into the next layers. Pruned tokens leave the KV cache; kept and recycled ones keep the positions
of the slots they occupy.

The score rows are computed for every question token (raters are chosen among them), so the cost is known
from the prompt alone: `scoring_rows` = question tokens per sample.

Reference vs paper (Gumpest/SparseVLMs, v1.5 code): the paper picks raters from the text-visual relation,
sets each layer's pruning count adaptively from the rank of the attention matrix, and recycles pruned tokens by
density-peak clustering. The reference selects raters once, before layer 0, from raw embedding dot products
(softmax over text of visual·text, mean over visual, above the mean); sets the rank term to 0, so the counts
come from fixed tables (`sparse_token_list_192 = [300, 200, 110]` visual tokens kept at layers 2, 6 and 15 of
LLaVA-1.5's 576); recycles the top 30% of the dropped by score into int(n / 10) + 1 DPC-kNN clusters placed
right after the kept visual tokens with positions re-numbered contiguously; prunes after the pruning layer
using its own attention; and supports batch size 1 only (`mask[0]`, `pre_prompt_length_list[0]`). Here raters
come from the scoring layer's own attention, the count is a fraction per stage, cluster centres are the
best-scored candidates (nearest-centre assignment instead of DPC-kNN), and positions stay original. The
reference's fixed 576-token image span (LLaVA-1.5) has no `image_newline` tokens; on LLaVA-OV they are
visual tokens here, rated, dropped and recycled like the rest, after the first pruning layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from visor.backbones import backbone_for
from visor.modeling.layers import head_states
from visor.reduction.pruned import PruningPlan, Tokens, check_keep, check_layer, pruned

REFERENCE_LAYERS = (2, 6, 15)  # of LLaVA-1.5's 32 layers


def default_layers(num_layers: int) -> list[int]:
    """The reference's pruning layers scaled to the model's depth."""
    return sorted({min(num_layers - 1, max(1, int(layer * num_layers / 32 + 0.5))) for layer in REFERENCE_LAYERS})


def question(tokens: Tokens) -> torch.Tensor:
    """(B, n) real text tokens after each sample's last visual token."""
    last_visual = torch.where(tokens.visual & tokens.valid, tokens.index, -1).max(dim=1).values
    return tokens.valid & ~tokens.visual & (tokens.index > last_visual[:, None])


def question_counts(config, inputs: dict) -> torch.Tensor:
    """(B,) question tokens per sample of a prompt batch (the score rows SparseVLM computes)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    visual = backbone_for(config).visual_token_mask(ids)
    order = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_visual = torch.where(visual, order, -1).max(dim=1).values
    return (valid & ~visual & (order > last_visual[:, None])).sum(dim=1)


def rater_attention(layer, layer_input: torch.Tensor, rope, keys: torch.Tensor, tokens: Tokens,
                    layer_output: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) attention from the raters among the question tokens, averaged over heads and raters."""
    attention = layer.self_attn
    asks = question(tokens)
    width = int(asks.sum(dim=1).max())
    rows = (~asks).long().argsort(dim=1, stable=True)[:, :width]  # question slots first, in order
    asking = asks.gather(1, rows)

    def take(values):
        return values.gather(1, rows[..., None].expand(*rows.shape, values.shape[-1]))

    query = head_states(attention, "q", layer.input_layernorm(take(layer_input)))  # (B, H, Q, head_dim)
    query, _ = apply_rotary_pos_emb(query, query, take(rope[0]), take(rope[1]))
    logits = query @ repeat_kv(keys, attention.num_key_value_groups).transpose(2, 3) * attention.scaling
    visible = tokens.valid[:, None, :] & (tokens.index[:, None, :] <= tokens.index.gather(1, rows)[:, :, None])
    visible |= ~asking[..., None]  # filler rows (shorter questions) read everything: finite, and never used
    weights = logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)  # (B, Q, n)
    on_image = (weights * tokens.visual[:, None, :]).sum(dim=-1)
    mean_on_image = (on_image * asking).sum(dim=1, keepdim=True) / asking.sum(dim=1, keepdim=True).clamp(min=1)
    raters = asking & (on_image >= mean_on_image)
    return (weights * raters[..., None]).sum(dim=1) / raters.sum(dim=1, keepdim=True).clamp(min=1)


@dataclass(frozen=True)
class Recycling:
    """Merge the best-scored `share` of the dropped tokens into about one token per `per_cluster` of them."""

    share: float = 0.3
    per_cluster: int = 10

    def _counts(self, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = torch.minimum((dropped.double() * self.share).long() + 1, dropped)
        return candidates, torch.minimum(candidates // self.per_cluster + 1, candidates)

    def count(self, dropped: int) -> int:
        return int(self._counts(torch.tensor([dropped]))[1][0])

    def flops(self, dropped: int, width: int) -> int:
        """The candidates × centres cosine similarities (normalising and averaging are element-wise)."""
        candidates, clusters = (int(count[0]) for count in self._counts(torch.tensor([dropped])))
        return 2 * candidates * clusters * width

    def __call__(self, scores, tokens: Tokens, keep: torch.Tensor, hidden: torch.Tensor):
        dropped = tokens.visual & tokens.valid & ~keep
        candidates, clusters = self._counts(dropped.sum(dim=1))
        rank = scores.masked_fill(~dropped, float("-inf")).argsort(dim=1, descending=True, stable=True)
        width, centres = int(candidates.max()), int(clusters.max())
        if centres == 0:
            return keep, hidden
        members = rank[:, :width]  # best-scored dropped tokens first; the first `clusters` are the centres
        is_member = torch.arange(width, device=hidden.device)[None, :] < candidates[:, None]
        is_centre = torch.arange(centres, device=hidden.device)[None, :] < clusters[:, None]
        states = hidden.gather(1, members[..., None].expand(-1, -1, hidden.shape[-1]))
        unit = functional.normalize(states, dim=-1)
        similarity = (unit @ unit[:, :centres].transpose(1, 2)).masked_fill(~is_centre[:, None, :], float("-inf"))
        joins = similarity.argmax(dim=-1).masked_fill(~is_member, centres)  # non-members go to a dummy cluster
        sums = hidden.new_zeros(len(hidden), centres + 1, hidden.shape[-1])
        sums.scatter_add_(1, joins[..., None].expand_as(states), states)
        sizes = hidden.new_zeros(len(hidden), centres + 1, dtype=torch.float).scatter_add_(
            1, joins, torch.ones(joins.shape, device=hidden.device))
        merged = (sums / sizes.clamp(min=1)[..., None]).to(hidden.dtype)[:, :centres]
        centre_slots = members[:, :centres]
        hidden = hidden.scatter(1, centre_slots[..., None].expand_as(merged), torch.where(
            is_centre[..., None], merged, hidden.gather(1, centre_slots[..., None].expand_as(merged))))
        keep = keep.scatter(1, centre_slots, keep.gather(1, centre_slots) | is_centre)
        return keep, hidden


def sparsevlm_plan(config, keep: float = 0.5, layers: Sequence[int] | None = None, recycle: bool = True) -> PruningPlan:
    num_layers = config.text_config.num_hidden_layers
    layers = default_layers(num_layers) if layers is None else list(layers)
    check_keep(keep)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"pruning layers must be distinct layers, got {layers}")
    for layer in layers:
        check_layer(layer, num_layers, "pruning layer")
    return PruningPlan({layer: keep for layer in layers}, rater_attention, recycler=Recycling() if recycle else None,
                       scoring_rows=question_counts, name="sparsevlm",
                       details=dict(layers=sorted(layers), keep=keep, recycle=recycle))


def sparsevlm(model, keep: float = 0.5, layers: Sequence[int] | None = None, recycle: bool = True):
    """`model` (a stock model) keeping `keep` of the visual tokens left at each of `layers`, recycling some."""
    return pruned(model, sparsevlm_plan(model.config, keep, layers, recycle))
