"""The one analytic FLOP counter: plain functions of a config and token counts.

Nothing here builds a model, so a 0.5B or 7B config costs the same to count as a tiny one, and every table in
the project (benchmarks, policy budgets, baselines) comes from the same arithmetic.

Conventions:
- FLOPs, not MACs: an (m×k)·(k×n) matmul costs 2·m·k·n.
- Counted: every linear layer (GQA shapes: q and o are H·head_dim wide, k and v H_kv·head_dim; SwiGLU's three
  matrices), attention scores and value products as computed (the full rectangle, no halving for the causal
  mask, per query head), the CA blocks, the CPE convolution, the projector, the vision tower, the lm_head.
- Ignored: norms, activations, softmax, RoPE, residual adds, gates, biases, embedding lookups, anyres
  packing and video pooling (an interpolation). They are element-wise and small, and
  `torch.utils.flop_counter.FlopCounterMode` ignores them too: with eager attention it agrees with this module
  exactly (tests/test_flops.py).

Per sample with N_v visual and N_t text tokens (S = N_v + N_t), a layer is one of the kinds of a
`visor.config.Schedule`, which every count takes explicitly: SA = the stock layer over S tokens; text = the stock
layer over N_t tokens; CA = a CA block, then a text layer. The vision side (how many crops and tokens an image
becomes, what the vision tower costs) comes from the model family's backbone adapter (`visor.backbones`).

The same arithmetic gives the bytes of the KV cache a prompt leaves (`kv_cache_bytes`): what a decode step reads
besides the weights, and what limits how many requests a server holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from visor.backbones import ImageTokens, backbone_for
from visor.backbones.base import linear_flops
from visor.config import Schedule


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass, by part (e.g. `layers`, `cross_attention`, `lm_head`)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


# ---- the language model ---------------------------------------------------------------------------------------
def llm_prefill_flops(
    config,
    visual_tokens: int,
    text_tokens: int,
    schedule: Schedule,
    logits_tokens: int = 1,
) -> FlopCount:
    """LLM FLOPs of one prompt (the headline number) under `schedule`: decoder layers, CA blocks, CPE and lm_head.

    `logits_tokens`: the positions the lm_head runs on (1 in generation; the whole sequence in a training forward).
    """
    _check_counts(visual_tokens=visual_tokens, text_tokens=text_tokens, logits_tokens=logits_tokens)
    visual = visual_tokens if schedule.visual else 0
    text_config = config.text_config
    layers = cross = 0
    for layer in range(text_config.num_hidden_layers):
        if layer in schedule.cross_attention:
            cross += _cross_attention_flops(config, text_tokens, visual, project_visual=True)
        tokens = visual + text_tokens if layer in schedule.self_attention else text_tokens
        layers += _decoder_layer_flops(text_config, tokens, tokens)
    return FlopCount(
        {
            "layers": layers,
            "cross_attention": cross,
            "position_encoding": _position_encoding_flops(config, visual) if schedule.position_encoding else 0,
            "lm_head": _lm_head_flops(text_config, logits_tokens),
        }
    )


def layerwise_prefill_flops(
    config,
    layer_tokens: Iterable[tuple[int, int]],
    ranking_flops: int = 0,
    logits_tokens: int = 1,
) -> FlopCount:
    """LLM prefill FLOPs of the stock layers with a token count of their own each (token-reduction baselines).

    `layer_tokens[l] = (queries, keys)`: layer l runs q/o and the MLP on `queries` tokens, computes k/v for all
    `keys` tokens (a superset: e.g. frozen visual tokens that only serve as keys) and attention queries × keys.
    `ranking_flops`: what a method spends choosing and merging tokens (e.g. `attention_row_flops` per score row).
    With every layer at (S, S) and no ranking this is `llm_prefill_flops(config, …, Schedule.full(config))`.
    """
    text_config = config.text_config
    width = text_config.hidden_size
    _, kv_heads, head_dim = _attention_shape(text_config)
    layers = 0
    for queries, keys in layer_tokens:
        _check_counts(queries=queries, extra_keys=keys - queries)
        layers += _decoder_layer_flops(text_config, queries, keys) + 2 * linear_flops(keys - queries, width, kv_heads * head_dim)
    return FlopCount({"layers": layers, "ranking": ranking_flops, "lm_head": _lm_head_flops(text_config, logits_tokens)})


def attention_row_flops(config, keys: int) -> int:
    """One attention-score row a method computes to rank tokens: a token's q projection and its scores against
    `keys` cached keys, in every head."""
    heads, _, head_dim = _attention_shape(config.text_config)
    return linear_flops(1, config.text_config.hidden_size, heads * head_dim) + 2 * heads * keys * head_dim


def layerwise_decode_flops_per_token(config, layer_keys: Iterable[int]) -> FlopCount:
    """LLM FLOPs of decoding one token when layer l's cache holds `layer_keys[l]` keys (the new one included),
    e.g. after in-LLM token pruning; linears run on the new token only."""
    text_config = config.text_config
    layers = 0
    for keys in layer_keys:
        _check_counts(keys=keys)
        layers += _decoder_layer_flops(text_config, 1, keys)
    return FlopCount({"layers": layers, "lm_head": _lm_head_flops(text_config, 1)})


def prompt_token_counts(config, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(visual, text) token counts per sample of a prompt batch (`input_ids`, optional `attention_mask`),
    padding excluded: what every per-sample FLOPs figure of a batch is computed from. Visual tokens are the image
    tokens and, in a family that reads video, the video tokens."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    visual = (backbone_for(config).visual_token_mask(ids) & valid).sum(dim=1)
    return visual, valid.sum(dim=1) - visual


def prompt_prefill_flops(config, inputs: dict, schedule: Schedule) -> torch.Tensor:
    """(B,) `llm_prefill_flops` of each prompt of a batch under one schedule."""
    visual, text = prompt_token_counts(config, inputs)
    return torch.tensor([llm_prefill_flops(config, v, t, schedule).total for v, t in zip(visual.tolist(), text.tolist())])


def decode_flops_per_token(
    config,
    visual_tokens: int,
    text_tokens: int,
    schedule: Schedule,
    step: int = 0,
) -> FlopCount:
    """LLM FLOPs of decoding one token with a KV cache, `step` tokens after the prompt.

    Linears run on the new token only; attention reads the cached keys it can see: SA layers the N_v visual
    keys plus N_t + step + 1 text keys, text and CA layers the text keys only; a CA block reads its N_v visual
    keys/values cached at prefill (they are not recomputed). The lm_head runs on the one new token.
    """
    _check_counts(visual_tokens=visual_tokens, text_tokens=text_tokens, step=step)
    visual = visual_tokens if schedule.visual else 0
    text_keys = text_tokens + step + 1
    text_config = config.text_config
    layers = cross = 0
    for layer in range(text_config.num_hidden_layers):
        if layer in schedule.cross_attention:
            cross += _cross_attention_flops(config, 1, visual, project_visual=False)
        keys = visual + text_keys if layer in schedule.self_attention else text_keys
        layers += _decoder_layer_flops(text_config, 1, keys)
    return FlopCount({"layers": layers, "cross_attention": cross, "lm_head": _lm_head_flops(text_config, 1)})


def kv_cache_bytes(config, visual_tokens: int, text_tokens: int, schedule: Schedule, element_size: int) -> dict[str, int]:
    """Bytes of keys and values one prompt leaves in the cache: {"visual": …, "text": …}.

    Every layer keeps its text tokens' keys/values; visual ones stay in the SA layers (the host layer's K/V heads)
    and in the CA blocks (their own K/V heads, `cross_attention_key_value_heads`). Equals `VisorCache.nbytes()`
    after prefill (tests/test_flops.py).
    """
    _check_counts(visual_tokens=visual_tokens, text_tokens=text_tokens)
    visual = visual_tokens if schedule.visual else 0
    text_config = config.text_config
    _, kv_heads, head_dim = _attention_shape(text_config)
    cross_heads = getattr(config, "cross_attention_key_value_heads", None) or kv_heads
    per_token = 2 * head_dim * element_size  # one key and one value per head
    layers = text_config.num_hidden_layers
    visual_heads = len(schedule.self_attention) * kv_heads + len(schedule.cross_attention) * cross_heads
    return {"visual": visual * visual_heads * per_token, "text": text_tokens * layers * kv_heads * per_token}


def router_flops(config) -> int:
    """The policy's router: its 2-layer MLP on one (2·d) feature vector per sample, plus its novelty
    guard's product of that vector with the M stored training features (the distances to them).

    Counted in every total of a routed run ("auto"); the mean pooling, LayerNorm, norms and top-k are
    element-wise or comparisons (ignored).
    """
    features = 2 * config.text_config.hidden_size
    return (linear_flops(1, features, config.router_hidden_size)
            + linear_flops(1, config.router_hidden_size, len(config.configurations))
            + linear_flops(1, features, config.router_novelty_references))


def savings(full_flops: Iterable[int], method_flops: Iterable[int]) -> float:
    """Savings of a method on a dataset: sum of full-model FLOPs / sum of method FLOPs."""
    full, method = list(full_flops), list(method_flops)
    if len(full) != len(method) or not full:
        raise ValueError(f"need one full and one method count per sample, got {len(full)} and {len(method)}")
    if sum(method) <= 0:
        raise ValueError("method FLOPs sum to zero: savings are undefined")
    return sum(full) / sum(method)


# ---- the vision side ---------------------------------------------------------------------------------------------
def image_tokens(config, image_size: tuple[int, int]) -> ImageTokens:
    """Crops and visual tokens of one (height, width) image, as the family's stock code computes them."""
    return backbone_for(config).image_tokens(image_size)


def vision_flops(config, image_size: tuple[int, int]) -> FlopCount:
    """The vision tower and projector on one (height, width) image (the family's `Backbone.vision_flops`)."""
    return FlopCount(backbone_for(config).vision_flops(tuple(image_size)))


def video_tokens(config, frames: int) -> ImageTokens:
    """Frames (each through the vision tower) and visual tokens of one video, as the family's stock code computes
    them (`Backbone.video_tokens`)."""
    return backbone_for(config).video_tokens(frames)


def video_vision_flops(config, frames: int) -> FlopCount:
    """The vision tower and projector on one video of `frames` frames (`Backbone.video_vision_flops`)."""
    return FlopCount(backbone_for(config).video_vision_flops(frames))


def nominal_vision_flops(config, visual_tokens: int) -> FlopCount:
    """The vision side of an image known only by its visual-token count (`Backbone.nominal_vision_flops`)."""
    _check_counts(visual_tokens=visual_tokens)
    return FlopCount(backbone_for(config).nominal_vision_flops(visual_tokens))


# ---- building blocks -----------------------------------------------------------------------------------------------
def _attention_shape(text_config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of the text model's attention."""
    heads = text_config.num_attention_heads
    kv_heads = text_config.num_key_value_heads or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, kv_heads, head_dim


def _decoder_layer_flops(text_config, queries: int, keys: int) -> int:
    """One stock decoder layer: projections and SwiGLU MLP on `queries` tokens, attention over `keys` keys."""
    width, ffn = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads, head_dim = _attention_shape(text_config)
    projections = 2 * linear_flops(queries, width, heads * head_dim) + 2 * linear_flops(queries, width, kv_heads * head_dim)
    attention = 2 * 2 * heads * queries * keys * head_dim
    mlp = 3 * linear_flops(queries, width, ffn)
    return projections + attention + mlp


def _cross_attention_flops(config, text: int, visual: int, project_visual: bool) -> int:
    """One CA block: q/o on the text, k/v on the visual tokens (only when not cached), text×visual attention.

    With no visual token the block skips attention entirely; the optional MLP always runs on the text.
    """
    text_config = config.text_config
    width = text_config.hidden_size
    heads, kv_heads, head_dim = _attention_shape(text_config)
    kv_heads = config.cross_attention_key_value_heads or kv_heads
    flops = 0
    if visual > 0:
        flops += 2 * linear_flops(text, width, heads * head_dim)
        flops += 2 * 2 * heads * text * visual * head_dim
        if project_visual:
            flops += 2 * linear_flops(visual, width, kv_heads * head_dim)
    if config.cross_attention_mlp:
        flops += 3 * linear_flops(text, width, max(1, text_config.intermediate_size // 4))
    return flops


def _position_encoding_flops(config, visual: int) -> int:
    """The CPE's depth-wise 1-D convolution: 2 · N_v · d · kernel."""
    return 2 * visual * config.text_config.hidden_size * config.position_encoding_kernel


def _lm_head_flops(text_config, logits_tokens: int) -> int:
    return linear_flops(logits_tokens, text_config.hidden_size, text_config.vocab_size)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
