"""One stock decoder layer run as one of the layer kinds: every loop of the project (VISOR's prefill and decoding,
in-LLM pruning, the analysis probes) calls the stock layers through these functions.

    SA         `run_layer` over [visual; text] in the original order               (visual tokens updated)
    text       `run_layer` over the text stream alone                            (visual tokens skip the layer)
    read       `read_visual_layer`: text queries; the visual tokens give keys and values through the layer's
               own norm and k/v projections from their frozen states             (visual tokens skip the layer)

(VISOR's CA kind is a new block in front of a text layer: `visor.modeling.cross_attention`.) The stock layer files
its keys and values in the cache object it is given, so each loop decides what is kept by the cache it passes.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from visor.modeling.layout import TokenLayout, attention_bias

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), (B, N, head_dim)


def run_layer(layer, hidden: torch.Tensor, bias: torch.Tensor | None, rope: Rope, cache=None) -> torch.Tensor:
    """The stock layer over `hidden` (B, N, d), with an additive mask (None: plain causal) and rotary embeddings
    of exactly these tokens; `cache` receives the keys it computes."""
    return layer(hidden, attention_mask=bias, position_embeddings=rope, past_key_values=cache,
                 use_cache=cache is not None)


def head_states(attention, kind: str, hidden: torch.Tensor) -> torch.Tensor:
    """(B, H, N, head_dim) queries, keys or values (`kind` "q", "k" or "v") of `hidden` (B, N, d, already
    normed) through a stock attention module's projection, with its per-head norm where the family has one
    (Qwen3's `q_norm`, `k_norm`)."""
    projection = getattr(attention, f"{kind}_proj")
    heads = projection.out_features // attention.head_dim  # explicit: N may be 0 (a prompt without image)
    states = projection(hidden).view(*hidden.shape[:2], heads, attention.head_dim)
    norm = getattr(attention, f"{kind}_norm", None)
    return (states if norm is None else norm(states)).transpose(1, 2)


def split_rope(layout: TokenLayout, rope: Rope) -> tuple[Rope, Rope]:
    """The rotary embeddings of a whole sequence, split into its visual and its text stream."""
    (visual_cos, text_cos), (visual_sin, text_sin) = (layout.split(part) for part in rope)
    return (visual_cos, visual_sin), (text_cos, text_sin)


def read_visual_layer(layer, layout: TokenLayout, hidden: torch.Tensor, rope: Rope, cache) -> torch.Tensor:
    """The `read` kind: only text tokens are queries; visual tokens serve as keys and values from their frozen
    states (with the layer's own norm and k/v projections, RoPE at their positions) and are not updated.
    `cache` gets the visual keys, then the text keys the layer call appends."""
    visual, text = layout.split(hidden)
    visual_rope, text_rope = split_rope(layout, rope)
    attention = layer.self_attn
    normed = layer.input_layernorm(visual)
    keys, values = head_states(attention, "k", normed), head_states(attention, "v", normed)
    keys, _ = apply_rotary_pos_emb(keys, keys, *visual_rope)
    cache.update(keys, values, attention.layer_idx)
    allowed = torch.cat([layout.cross_mask(), layout.text_mask()], dim=2)
    text = run_layer(layer, text, attention_bias(allowed, hidden.dtype), text_rope, cache)
    return layout.merge(visual, text)


def text_layer(layer, layout: TokenLayout, hidden: torch.Tensor, rope: Rope, cache) -> torch.Tensor:
    """The `text` kind on a whole sequence: the layer runs on its text tokens alone; visual tokens skip it."""
    visual, text = layout.split(hidden)
    _, text_rope = split_rope(layout, rope)
    text = run_layer(layer, text, attention_bias(layout.text_mask(), hidden.dtype), text_rope, cache)
    return layout.merge(visual, text)
