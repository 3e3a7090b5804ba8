"""The one analytic FLOP counter (DESIGN.md 5): plain functions of a config and token counts.

Nothing here builds a model, so a 0.5B or 7B config costs the same to count as a tiny one, and every table in
the project (benchmarks, policy budgets, baselines) comes from the same arithmetic.

Conventions:
- FLOPs, not MACs: an (m×k)·(k×n) matmul costs 2·m·k·n.
- Counted: every linear layer (GQA shapes: q and o are H·head_dim wide, k and v H_kv·head_dim; SwiGLU's three
  matrices), attention scores and value products as computed (the full rectangle, no halving for the causal
  mask, per query head), the CA blocks, the CPE convolution, the projector, the vision tower, the lm_head.
- Ignored: norms, activations, softmax, RoPE, residual adds, gates, biases, embedding lookups and anyres
  packing. They are element-wise and small, and `torch.utils.flop_counter.FlopCounterMode` ignores them too:
  with eager attention it agrees with this module exactly (tests/test_flops.py).

Per sample with N_v visual and N_t text tokens (S = N_v + N_t), a layer is one of (DESIGN.md 2.2):
SA = the stock layer over S tokens; text = the stock layer over N_t tokens; CA = a CA block, then a text layer.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple

import torch
from transformers import LlavaOnevisionConfig
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    image_size_to_num_patches,
)

from visor.config import VisorConfig

Configuration = int | Literal["full", "text-only"] | None


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass, by part (e.g. `layers`, `cross_attention`, `lm_head`)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


# ---- the language model ---------------------------------------------------------------------------------------
def llm_prefill_flops(
    config: LlavaOnevisionConfig,
    visual_tokens: int,
    text_tokens: int,
    configuration: Configuration = None,
    logits_tokens: int = 1,
) -> FlopCount:
    """LLM FLOPs of one prompt (the headline number): decoder layers, CA blocks, CPE and lm_head.

    `configuration`: an index into `config.configurations` (VISOR), `"full"` (the stock model: every layer SA,
    no CA, no CPE), `"text-only"` (the floor: no visual token in the LLM at all), or None for the model's
    default (the largest configuration of a `VisorConfig`, the stock model otherwise). `logits_tokens`: the
    positions the lm_head runs on (1 in generation; the whole sequence in a training forward).
    """
    _check_counts(visual_tokens=visual_tokens, text_tokens=text_tokens, logits_tokens=logits_tokens)
    schedule = _schedule(config, configuration)
    visual = 0 if schedule.text_only else visual_tokens
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
    config: LlavaOnevisionConfig,
    layer_tokens: Iterable[tuple[int, int]],
    scoring: Iterable[tuple[int, int]] = (),
    logits_tokens: int = 1,
) -> FlopCount:
    """LLM prefill FLOPs of the stock layers with a token count of their own each (token-reduction baselines).

    `layer_tokens[l] = (queries, keys)`: layer l runs q/o and the MLP on `queries` tokens, computes k/v for all
    `keys` tokens (a superset: e.g. frozen visual tokens that only serve as keys) and attention queries × keys.
    `scoring`: extra attention-score rows a method computes to rank tokens, as (queries, keys): the q
    projection of `queries` tokens and their scores against `keys` cached keys, in every head. With every layer
    at (S, S) and no scoring this is `llm_prefill_flops(config, …, "full")`.
    """
    text_config = config.text_config
    width = text_config.hidden_size
    heads, kv_heads, head_dim = _attention_shape(text_config)
    layers = 0
    for queries, keys in layer_tokens:
        _check_counts(queries=queries, extra_keys=keys - queries)
        layers += _decoder_layer_flops(text_config, queries, keys) + 2 * _linear(keys - queries, width, kv_heads * head_dim)
    score = sum(_linear(queries, width, heads * head_dim) + 2 * heads * queries * keys * head_dim for queries, keys in scoring)
    return FlopCount({"layers": layers, "scoring": score, "lm_head": _lm_head_flops(text_config, logits_tokens)})


def layerwise_decode_flops_per_token(config: LlavaOnevisionConfig, layer_keys: Iterable[int]) -> FlopCount:
    """LLM FLOPs of decoding one token when layer l's cache holds `layer_keys[l]` keys (the new one included),
    e.g. after in-LLM token pruning; linears run on the new token only."""
    text_config = config.text_config
    layers = 0
    for keys in layer_keys:
        _check_counts(keys=keys)
        layers += _decoder_layer_flops(text_config, 1, keys)
    return FlopCount({"layers": layers, "lm_head": _lm_head_flops(text_config, 1)})


def prompt_token_counts(config: LlavaOnevisionConfig, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(visual, text) token counts per sample of a prompt batch (`input_ids`, optional `attention_mask`),
    padding excluded: what every per-sample FLOPs figure of a batch is computed from."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    visual = ((ids == config.image_token_id) & valid).sum(dim=1)
    return visual, valid.sum(dim=1) - visual


def prompt_prefill_flops(config: LlavaOnevisionConfig, inputs: dict, configuration: Configuration = "full") -> torch.Tensor:
    """(B,) `llm_prefill_flops` of each prompt of a batch at one configuration (default: the stock model)."""
    visual, text = prompt_token_counts(config, inputs)
    return torch.tensor([llm_prefill_flops(config, v, t, configuration).total
                         for v, t in zip(visual.tolist(), text.tolist())])


def decode_flops_per_token(
    config: LlavaOnevisionConfig,
    visual_tokens: int,
    text_tokens: int,
    configuration: Configuration = None,
    step: int = 0,
) -> FlopCount:
    """LLM FLOPs of decoding one token with a KV cache, `step` tokens after the prompt.

    Linears run on the new token only; attention reads the cached keys it can see: SA layers the N_v visual
    keys plus N_t + step + 1 text keys, text and CA layers the text keys only; a CA block reads its N_v visual
    keys/values cached at prefill (they are not recomputed). The lm_head runs on the one new token.
    """
    _check_counts(visual_tokens=visual_tokens, text_tokens=text_tokens, step=step)
    schedule = _schedule(config, configuration)
    visual = 0 if schedule.text_only else visual_tokens
    text_keys = text_tokens + step + 1
    text_config = config.text_config
    layers = cross = 0
    for layer in range(text_config.num_hidden_layers):
        if layer in schedule.cross_attention:
            cross += _cross_attention_flops(config, 1, visual, project_visual=False)
        keys = visual + text_keys if layer in schedule.self_attention else text_keys
        layers += _decoder_layer_flops(text_config, 1, keys)
    return FlopCount({"layers": layers, "cross_attention": cross, "lm_head": _lm_head_flops(text_config, 1)})


def router_flops(config: VisorConfig) -> int:
    """The policy's router (DESIGN.md 3): its 2-layer MLP on one (2·d) feature vector per sample, plus its novelty
    guard's product of that vector with the M stored training features (the distances to them).

    Counted in every total of a routed run ("auto"); the mean pooling, LayerNorm, norms and top-k are
    element-wise or comparisons (ignored).
    """
    features = 2 * config.text_config.hidden_size
    return (_linear(1, features, config.router_hidden_size)
            + _linear(1, config.router_hidden_size, len(config.configurations))
            + _linear(1, features, config.router_novelty_references))


def savings(full_flops: Iterable[int], method_flops: Iterable[int]) -> float:
    """Savings of a method on a dataset: sum of full-model FLOPs / sum of method FLOPs (DESIGN.md 5)."""
    full, method = list(full_flops), list(method_flops)
    if len(full) != len(method) or not full:
        raise ValueError(f"need one full and one method count per sample, got {len(full)} and {len(method)}")
    if sum(method) <= 0:
        raise ValueError("method FLOPs sum to zero: savings are undefined")
    return sum(full) / sum(method)


# ---- the vision side ---------------------------------------------------------------------------------------------
class ImageTokens(NamedTuple):
    crops: int  # crops through the vision tower (anyres grid + the base view)
    visual_tokens: int  # tokens the language model sees after packing (unpadding, downsizing, newlines)


def image_tokens(config: LlavaOnevisionConfig, image_size: tuple[int, int]) -> ImageTokens:
    """Crops and visual tokens of one (height, width) image, as LLaVA-OV's own anyres code computes them.

    The crop count is transformers' `image_size_to_num_patches`; the token count runs the model's
    `pack_image_features` on 1-channel zero features, so it follows transformers exactly (a single image per
    sample, as `get_image_features` treats it).
    """
    height, width = image_size
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive (height, width), got {image_size}")
    vision = config.vision_config
    crops = image_size_to_num_patches([height, width], config.image_grid_pinpoints, vision.image_size)
    features = torch.zeros(crops, tokens_per_crop(config), 1)
    packer = types.SimpleNamespace(config=config)  # pack_image_features reads nothing but self.config
    packed, _ = LlavaOnevisionModel.pack_image_features(
        packer, [features], torch.tensor([[height, width]]), torch.zeros(1), config.vision_aspect_ratio
    )
    return ImageTokens(crops, packed[0].shape[0])


def vision_flops(config: LlavaOnevisionConfig, num_crops: int) -> FlopCount:
    """Vision tower (SigLIP: patch conv, every layer's q/k/v/o, attention, fc1/fc2) and projector over every crop.

    The projector runs on every crop patch before LLaVA-OV's unpadding, so this depends on crops, not tokens.
    """
    _check_counts(num_crops=num_crops)
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    width = vision.hidden_size
    patch_embedding = 2 * patches * width * vision.num_channels * vision.patch_size**2
    per_layer = (
        4 * _linear(patches, width, width)  # q, k, v, o
        + 2 * 2 * patches * patches * width  # scores and values over all heads (heads × head_dim = width)
        + 2 * _linear(patches, width, vision.intermediate_size)  # fc1, fc2
    )
    tower = patch_embedding + vision.num_hidden_layers * per_layer
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    text_width = config.text_config.hidden_size
    tokens = tokens_per_crop(config)
    projector = _linear(tokens, width * feature_layers, text_width) + _linear(tokens, text_width, text_width)
    return FlopCount({"vision_tower": num_crops * tower, "projector": num_crops * projector})


def tokens_per_crop(config: LlavaOnevisionConfig) -> int:
    """Projected tokens per crop: the patch grid, minus the first token under the "default" strategy."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches - 1 if config.vision_feature_select_strategy == "default" else patches


# ---- building blocks -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Schedule:
    self_attention: frozenset[int]
    cross_attention: frozenset[int]
    position_encoding: bool
    text_only: bool = False


def _schedule(config: LlavaOnevisionConfig, configuration: Configuration) -> _Schedule:
    """Which layers are SA and which have a CA block for `configuration` (see `llm_prefill_flops`)."""
    is_visor = isinstance(config, VisorConfig)
    if configuration is None:
        configuration = config.largest_configuration if is_visor else "full"
    if configuration == "full":
        return _Schedule(frozenset(range(config.text_config.num_hidden_layers)), frozenset(), False)
    if configuration == "text-only":
        return _Schedule(frozenset(), frozenset(), False, text_only=True)
    if isinstance(configuration, str):
        raise ValueError(f"configuration must be an index, 'full' or 'text-only', got {configuration!r}")
    if not is_visor:
        raise ValueError(f"configuration {configuration} needs a VisorConfig; this config has only 'full' and 'text-only'")
    (index,) = config.resolve_configuration(configuration, 1)
    return _Schedule(
        frozenset(config.configurations[index]), frozenset(config.cross_attention_layers), config.position_encoding
    )


def _linear(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


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
    projections = 2 * _linear(queries, width, heads * head_dim) + 2 * _linear(queries, width, kv_heads * head_dim)
    attention = 2 * 2 * heads * queries * keys * head_dim
    mlp = 3 * _linear(queries, width, ffn)
    return projections + attention + mlp


def _cross_attention_flops(config: VisorConfig, text: int, visual: int, project_visual: bool) -> int:
    """One CA block: q/o on the text, k/v on the visual tokens (only when not cached), text×visual attention.

    With no visual token the block skips attention entirely; the optional MLP always runs on the text.
    """
    text_config = config.text_config
    width = text_config.hidden_size
    heads, kv_heads, head_dim = _attention_shape(text_config)
    kv_heads = config.cross_attention_key_value_heads or kv_heads
    flops = 0
    if visual > 0:
        flops += 2 * _linear(text, width, heads * head_dim)
        flops += 2 * 2 * heads * text * visual * head_dim
        if project_visual:
            flops += 2 * _linear(visual, width, kv_heads * head_dim)
    if config.cross_attention_mlp:
        flops += 3 * _linear(text, width, max(1, text_config.intermediate_size // 4))
    return flops


def _position_encoding_flops(config: VisorConfig, visual: int) -> int:
    """The CPE's depth-wise 1-D convolution: 2 · N_v · d · kernel."""
    return 2 * visual * config.text_config.hidden_size * config.position_encoding_kernel


def _lm_head_flops(text_config, logits_tokens: int) -> int:
    return _linear(logits_tokens, text_config.hidden_size, text_config.vocab_size)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
