"""In-LLM token reduction: the stock decoder layers over a per-sample set of tokens that shrinks with depth.

`PrunedModel` is the mixin of each family's pruned class (`pruned_class`: the mixin on the family's stock class,
built here, so the families need not know of pruning): it shares the weights of the model it is built from
(`pruned(model, plan)`) and owns the decoder loop (hooks cannot change which tokens a
layer sees). A `PruningPlan` says, per layer, what fraction of the visual tokens still present survive into it,
and how they are ranked (a `Scorer` reading the layer before), whether some dropped tokens are merged into a few
kept ones (a `Recycler`: SparseVLM), and in which layers visual tokens skip the layer: *read* layers (ShortV's
frozen layers: text-only queries, visual tokens only give keys/values from their frozen states) and *blind*
layers (the layer runs on text alone). Kept tokens keep their original positions (RoPE) and causal order, as in
FastV's reference code; dropped tokens leave the KV cache too, so every later layer's cache, and every decoding
step, reads only the kept ones. Text tokens are never dropped. Visual tokens are all of an image's `<image>`
positions, its `image_newline` tokens included: every layer before the first drop reads them all, and from
there on they are ranked and dropped like the other visual tokens. The analysis probes are plans too
(`visor.analysis.probe`): blind and read layers, and layers whose attention weights are handed to a callback.

Batches stay batches: each sample keeps its own count (a fraction of *its* visual tokens); the kept tokens are
compacted to the left of a (B, n_l) slot tensor and the masks carry validity, so no loop runs over samples.
Scores are computed only in the layers that rank (one attention row per sample for last-token scorers), so the
rest of the stack runs on the model's fast attention.
"""

from __future__ import annotations

import functools

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from visor.flops import attention_row_flops, layerwise_prefill_flops, prompt_token_counts
from visor.modeling.cache import LayerLoopCache, _bytes, resolve_cache
from visor.modeling.layers import read_visual_layer, run_layer, text_layer
from visor.modeling.layout import Slots, TokenLayout, attention_bias
from visor.modeling.visor import NEW_TOKENS_ARE_TEXT, embed_with_images


def kept_count(count, keep: float):
    """Visual tokens kept out of `count` at fraction `keep`: round(keep · count), at least one of a non-empty set.

    Works on ints and on integer tensors alike, so the model and the FLOP count use the same rule.
    """
    kept = (count * keep + 0.5) // 1
    if isinstance(count, torch.Tensor):
        return torch.minimum(kept.long().clamp(min=1), count)
    return min(max(int(kept), 1), count)


def check_keep(keep: float, name: str = "keep") -> None:
    if not 0 < keep <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {keep}")


def check_layer(layer: int, num_layers: int, name: str = "layer", first: int = 1) -> None:
    if not first <= layer < num_layers:
        raise ValueError(f"{name} must be in [{first}, {num_layers - 1}] for a {num_layers}-layer model, got {layer}")


# ---- which tokens are where ----------------------------------------------------------------------------------------
@dataclass
class Tokens(Slots):
    """The tokens a layer sees: `Slots` of the prompt (n = the batch's largest count), and which are visual."""

    visual: torch.Tensor = None  # (B, n) a visual token

    @classmethod
    def start(cls, visual_mask: torch.Tensor, attention_mask: torch.Tensor) -> Tokens:
        batch, length = visual_mask.shape
        index = torch.arange(length, device=visual_mask.device).expand(batch, length)
        return cls(index, attention_mask.bool(), length, visual_mask)

    def last(self) -> torch.Tensor:
        """(B,) slot of each sample's last real token (the last prompt token)."""
        order = torch.arange(self.width, device=self.index.device)
        return torch.where(self.valid, order, -1).argmax(dim=1)

    def layout(self) -> TokenLayout:
        """The visual and text streams of these slots (positions relative to the slots)."""
        return TokenLayout.build(self.visual, self.valid)

    def scatter(self, full: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`full` (B, S, d) with each slot's values (B, n, d) written back at its original position."""
        padded = torch.nn.functional.pad(full, (0, 0, 0, 1))
        index = self.index[..., None].expand(*self.index.shape, full.shape[-1])
        return padded.scatter(1, index, values.to(full.dtype))[:, : self.length]

    def keep(self, keep: torch.Tensor, hidden: torch.Tensor) -> tuple[Tokens, torch.Tensor]:
        """Only the slots where `keep` (B, n) holds, compacted to the left; and their hidden states."""
        width = int(keep.sum(dim=1).max())
        order = (~keep).long().argsort(dim=1, stable=True)[:, :width]  # kept first, in order
        kept = keep.gather(1, order)
        index = self.index.gather(1, order).masked_fill(~kept, self.length)
        tokens = Tokens(index, self.valid.gather(1, order) & kept, self.length, self.visual.gather(1, order) & kept)
        return tokens, hidden.gather(1, order[..., None].expand(*order.shape, hidden.shape[-1]))


def select_top(scores: torch.Tensor, tokens: Tokens, keep: float) -> torch.Tensor:
    """(B, n) slots to keep: every text token and each sample's top `kept_count` visual tokens by score.

    Padding goes too: nothing attends to it, so later layers need not carry it.
    """
    candidate = tokens.visual & tokens.valid
    kept = kept_count(candidate.sum(dim=1), keep)
    ranked = scores.masked_fill(~candidate, float("-inf"))
    rank = ranked.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return tokens.valid & (~tokens.visual | (rank < kept[:, None]))


# Scorer(layer, layer_input, rope, keys, tokens, layer_output) → (B, n) visual-token scores from one decoder layer,
# given its input hidden states, rotary embeddings, the keys it cached (B, H_kv, n, head_dim) and its output.
Scorer = Callable[..., torch.Tensor]


class Recycler(Protocol):
    def count(self, dropped: int) -> int:
        """Tokens a sample gets back when `dropped` of its visual tokens are dropped."""

    def flops(self, dropped: int, width: int) -> int:
        """FLOPs of recycling `dropped` tokens of width `width` (the similarity matmul)."""

    def __call__(self, scores, tokens: Tokens, keep: torch.Tensor, hidden: torch.Tensor):
        """(keep, hidden) with `count(dropped)` more visual slots kept per sample, their states merged."""


@dataclass(frozen=True)
class PruningPlan:
    """What an in-LLM method does, layer by layer; data only, so its cost is known before a model is built."""

    drops: dict[int, float]  # layer → fraction of the visual tokens still present that enter it
    scorer: Scorer | None = None  # ranks visual tokens in the layer just before each drop
    frozen: frozenset[int] = frozenset()  # read layers: text-only queries, frozen visual tokens as keys (ShortV)
    blind: frozenset[int] = frozenset()  # text layers: visual tokens skip the layer and are not attended to
    measured: frozenset[int] = frozenset()  # layers whose attention weights go to the model's `on_weights`
    recycler: Recycler | None = None  # merges some dropped tokens into a few kept ones (SparseVLM)
    # (config, inputs) → (B,) query rows the scorer computes per sample; None: one (the last prompt token)
    scoring_rows: Callable[[object, dict], torch.Tensor] | None = None
    # (config, tokens) → FLOPs of one score row over `tokens` tokens; None: `visor.flops.attention_row_flops`, what
    # attention-based scorers compute
    scoring_row_flops: Callable[[object, int], int] | None = None
    name: str = "pruned"  # for printing, with `details`
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        # Keeping everything is no drop at all (no scoring either): the off switch is the stock model exactly.
        object.__setattr__(self, "drops", {layer: keep for layer, keep in self.drops.items() if keep < 1})
        if self.drops and self.scorer is None:
            raise ValueError("dropping tokens needs a scorer")
        skipping = self.frozen | self.blind
        if any(layer - 1 in skipping for layer in self.drops):
            raise ValueError("the layer before a drop scores the tokens, so visual tokens cannot skip it")
        if self.frozen & self.blind:
            raise ValueError(f"layers {sorted(self.frozen & self.blind)} cannot be both read and blind")
        if self.measured & skipping:
            raise ValueError(f"measured layers {sorted(self.measured & skipping)} must run over every token")

    def check_layers(self, num_layers: int) -> None:
        for name, layers in (("read", self.frozen), ("blind", self.blind), ("measured", self.measured),
                             ("drop", set(self.drops))):
            bad = sorted(layer for layer in layers if not 0 <= layer < num_layers)
            if bad:
                raise ValueError(f"{name} layers {bad} out of range 0..{num_layers - 1}")

    def visual_per_layer(self, config, inputs: dict) -> torch.Tensor:
        """(B, L) visual tokens each sample has in each layer (skipping it, in read and blind layers)."""
        visual, _ = prompt_token_counts(config, inputs)
        rows = []
        for count in visual.tolist():
            row = []
            for layer in range(config.text_config.num_hidden_layers):
                if layer in self.drops:
                    kept = kept_count(count, self.drops[layer])
                    count = kept + (self.recycler.count(count - kept) if self.recycler else 0)
                row.append(count)
            rows.append(row)
        return torch.tensor(rows)

    def prefill_flops(self, config, inputs: dict) -> torch.Tensor:
        """(B,) LLM prefill FLOPs: each layer at its own token count, plus the score rows before each drop and any
        recycling."""
        _, text = prompt_token_counts(config, inputs)
        rows = torch.ones_like(text) if self.scoring_rows is None else self.scoring_rows(config, inputs)
        row_flops = self.scoring_row_flops or attention_row_flops
        width = config.text_config.hidden_size
        flops = []
        for text_tokens, visual, score_rows in zip(text.tolist(), self.visual_per_layer(config, inputs).tolist(),
                                                   rows.tolist()):
            tokens = [text_tokens if layer in self.blind else text_tokens + count for layer, count in enumerate(visual)]
            queries = [text_tokens if layer in self.frozen else n for layer, n in enumerate(tokens)]
            scoring = sum(score_rows * row_flops(config, tokens[layer - 1]) for layer in self.drops)
            recycling = sum(
                self.recycler.flops(visual[layer - 1] - kept_count(visual[layer - 1], keep), width)
                for layer, keep in self.drops.items()
            ) if self.recycler else 0
            flops.append(layerwise_prefill_flops(config, list(zip(queries, tokens)), scoring + recycling).total)
        return torch.tensor(flops)


# ---- the model -------------------------------------------------------------------------------------------------
class PrunedModel:
    """A family's model whose language model runs `plan`; `pruned_class` sets `backbone_class`."""

    backbone_class: type
    _supports_flash_attn = False  # masks are explicit (B, 1, Q, K) tensors
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def __init__(self, config, plan: PruningPlan, on_weights: Callable[[int, torch.Tensor], None] | None = None):
        super().__init__(config)
        plan.check_layers(config.text_config.num_hidden_layers)
        if plan.measured and on_weights is None:
            raise ValueError("measured layers need an on_weights callback")
        self.plan, self.on_weights = plan, on_weights
        self.backbone = self.backbone_class(config)
        self.backbone.check_text_model(self)

    @property
    def text_stack(self):
        return self.backbone.language_model(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.plan.name}: {self.plan.details})"

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, logits_to_keep=0,
                image_features: list[torch.Tensor] | None = None, image_sizes=None, batch_num_images=None,
                image_grid_thw=None, mm_token_type_ids=None, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None, **kwargs):
        """Logits as the stock model's; tokens dropped inside the stack keep the hidden state they had then.

        `image_features` (per image, as `visor.modeling.visor.embed_with_images` takes them) may replace the
        images, e.g. to time the language model alone.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("in-LLM pruning needs input_ids (it finds the visual tokens by the <image> and <video> "
                             "token ids)")
        image_inputs = self.backbone.select_image_inputs(
            pixel_values=pixel_values, image_sizes=image_sizes, batch_num_images=batch_num_images,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, **kwargs)
        cache = resolve_cache(past_key_values, use_cache, PrunedCache, "in-LLM pruning")
        length = input_ids.shape[1]
        position_ids = self.backbone.positions(self, input_ids, attention_mask, cache, position_ids, **image_inputs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is not None and cache.is_prefilled:
            hidden = self._decode_layers(input_ids, attention_mask[:, -length:], position_ids, cache)
        else:
            hidden, visual_mask, additions = embed_with_images(self, input_ids, image_features, **image_inputs)
            hidden = self._prefill_layers(hidden, visual_mask, additions, attention_mask, position_ids,
                                          cache if cache is not None else PrunedCache())
        hidden = self.text_stack.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep]), past_key_values=cache)

    def _prefill_layers(self, hidden, visual_mask, additions, attention_mask, position_ids, cache) -> torch.Tensor:
        """The prompt through every layer; `additions` (DeepStack's, see `embed_with_images`) go to the tokens
        still there after their layer."""
        plan = self.plan
        tokens = Tokens.start(visual_mask, attention_mask)
        full_rope = self.text_stack.rotary_emb(hidden, position_ids)
        output = hidden
        keep = None
        for index, layer in enumerate(self.text_stack.layers):
            if keep is not None:
                output = tokens.scatter(output, hidden)
                tokens, hidden = tokens.keep(keep, hidden)
                keep = None
            rope = tuple(tokens.gather(part) for part in full_rope)
            if index in plan.frozen or index in plan.blind:
                layout = tokens.layout()
                if index in plan.frozen:
                    hidden = read_visual_layer(layer, layout, hidden, rope, cache)
                    cache.valid[index] = torch.cat([layout.visual.valid, layout.text.valid], dim=1)
                    cache.visual[index] = torch.cat([layout.visual.valid, torch.zeros_like(layout.text.valid)], dim=1)
                else:
                    hidden = text_layer(layer, layout, hidden, rope, cache)
                    cache.valid[index], cache.visual[index] = layout.text.valid, torch.zeros_like(layout.text.valid)
                hidden = _after_layer(hidden, tokens, additions, index)
                continue
            layer_input = hidden
            with self._watching(index, layer):
                hidden = run_layer(layer, hidden, attention_bias(tokens.causal_mask(), hidden.dtype), rope, cache)
            hidden = _after_layer(hidden, tokens, additions, index)
            cache.valid[index], cache.visual[index] = tokens.valid, tokens.visual & tokens.valid
            if index + 1 in plan.drops:
                scores = plan.scorer(layer, layer_input, rope, cache.keys[index], tokens, hidden)
                keep = select_top(scores, tokens, plan.drops[index + 1])
                if plan.recycler is not None:
                    keep, hidden = plan.recycler(scores, tokens, keep, hidden)
        cache.seen_tokens = visual_mask.shape[1]
        return tokens.scatter(output, hidden)

    def _decode_layers(self, input_ids, new_valid, position_ids, cache: PrunedCache) -> torch.Tensor:
        """New text tokens through every layer against the pruned cache."""
        if bool(self.backbone.visual_token_mask(input_ids).any()):
            raise ValueError(NEW_TOKENS_ARE_TEXT)
        hidden = self.get_input_embeddings()(input_ids)
        rope = self.text_stack.rotary_emb(hidden, position_ids)
        count = input_ids.shape[1]
        new_valid = new_valid.bool()
        among_new = torch.ones(count, count, dtype=torch.bool, device=hidden.device).tril()
        itself = torch.eye(count, dtype=torch.bool, device=hidden.device)
        for index, layer in enumerate(self.text_stack.layers):
            cached = cache.valid[index][:, None, :].expand(-1, count, -1)
            allowed = torch.cat([cached, (new_valid[:, None, :] & among_new) | itself], dim=2)
            with self._watching(index, layer):
                hidden = run_layer(layer, hidden, attention_bias(allowed, hidden.dtype), rope, cache)
            cache.valid[index] = torch.cat([cache.valid[index], new_valid], dim=1)
            cache.visual[index] = torch.cat([cache.visual[index], torch.zeros_like(new_valid)], dim=1)
        cache.seen_tokens += count
        return hidden

    @contextmanager
    def _watching(self, index: int, layer):
        """In a measured layer, eager attention and its softmax weights (B, H, Q, K) handed to `on_weights`."""
        if index not in self.plan.measured:
            yield
            return
        config = layer.self_attn.config
        previous = config._attn_implementation
        config._attn_implementation = "eager"
        hook = layer.self_attn.register_forward_hook(lambda module, args, output: self.on_weights(index, output[1]))
        try:
            yield
        finally:
            hook.remove()
            config._attn_implementation = previous

    # ---- cost ---------------------------------------------------------------------------------------------------
    def visual_per_layer(self, inputs: dict) -> torch.Tensor:
        return self.plan.visual_per_layer(self.config, inputs)

    def prefill_flops(self, inputs: dict) -> torch.Tensor:
        return self.plan.prefill_flops(self.config, inputs)


def _after_layer(hidden: torch.Tensor, tokens: Tokens, additions: list[torch.Tensor], index: int) -> torch.Tensor:
    """`hidden` with layer `index`'s DeepStack addition at the tokens still there (none past the first K layers)."""
    return hidden + tokens.gather(additions[index]) if index < len(additions) else hidden


@functools.cache
def pruned_class(backbone_class: type) -> type:
    """The family's pruned model class: `PrunedModel` on the family's stock model class
    (`PrunedLlavaOnevisionForConditionalGeneration` for LLaVA-OV), built once per family."""
    stock = backbone_class.stock_model_class
    return type(f"Pruned{stock.__name__}", (PrunedModel, stock),
                {"backbone_class": backbone_class, "__module__": __name__,
                 "__doc__": f"{stock.__name__} under an in-LLM token-reduction plan (`PrunedModel`)."})


def pruned(model, plan: PruningPlan, on_weights: Callable[[int, torch.Tensor], None] | None = None):
    """`model` (a stock model, or a VISOR one with every layer SA) running `plan`, on `model`'s own parameter and
    buffer tensors (nothing is copied)."""
    from visor.backbones import family

    attention = model.config.text_config._attn_implementation
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"in-LLM pruning runs with eager or sdpa attention, not {attention!r}")
    with torch.device("meta"):
        result = pruned_class(family(model.config).BACKBONE)(model.config, plan, on_weights)
    result.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, attribute = name.rpartition(".")
        result.get_submodule(owner)._buffers[attribute] = buffer
    result.generation_config = model.generation_config
    return result.train(model.training)


class PrunedCache(LayerLoopCache):
    """Per layer: the keys/values of the tokens that layer kept (plus decoded tokens) and which are valid."""

    def __init__(self):
        super().__init__()
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.valid: dict[int, torch.Tensor] = {}  # (B, keys of that layer)
        self.visual: dict[int, torch.Tensor] = {}  # (B, keys of that layer): a real visual token's key

    def __len__(self) -> int:
        return len(self.keys)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the keys/values allocated, split into real visual tokens' and the rest (text, padding)."""
        visual = 0
        for layer, keys in self.keys.items():
            visual += int(self.visual[layer].sum()) * 2 * keys.shape[1] * keys.shape[3] * keys.element_size()
        total = _bytes([*self.keys.values(), *self.values.values()])
        return {"visual": visual, "text": total - visual}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for store in (self.keys, self.values, self.valid, self.visual):
            for layer in store:
                store[layer] = store[layer].index_select(0, beam_idx.to(store[layer].device))
