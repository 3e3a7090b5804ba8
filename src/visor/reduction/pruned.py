"""In-LLM token reduction: the stock decoder layers over a per-sample set of tokens that shrinks with depth.

`PrunedLlava` is a `LlavaOnevisionForConditionalGeneration` that shares the weights of the model it is built
from and owns the decoder loop (hooks cannot change which tokens a layer sees). A `PruningPlan` says, per
layer, what fraction of the visual tokens still present survive into it, and how they are ranked (a `Scorer`
reading the layer before), whether some dropped tokens are merged into a few kept ones (a `Recycler`:
SparseVLM), and in which layers visual tokens are *frozen* (ShortV: text-only queries, visual tokens only give
keys/values from their frozen states). Kept tokens keep their original positions (RoPE) and
causal order, as in FastV's reference code; dropped tokens leave the KV cache too, so every later layer's
cache, and every decoding step, reads only the kept ones. Text tokens are never dropped. Visual tokens are all of
an image's `<image>` positions, its `image_newline` tokens included: every layer before the first drop reads
them all, and from there on they are ranked and dropped like the other visual tokens.

Batches stay batches: each sample keeps its own count (a fraction of *its* visual tokens); the kept tokens are
compacted to the left of a (B, n_l) slot tensor and the masks carry validity, so no loop runs over samples.
Scores are computed only in the layers that rank (one attention row per sample for last-token scorers), so the
rest of the stack runs on the model's fast attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from visor.flops import layerwise_prefill_flops, prompt_token_counts
from visor.modeling.cache import resolve_cache
from visor.modeling.layout import TokenLayout, attention_bias


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
class Tokens:
    """The tokens a layer sees, per sample compacted to the left of n slots (n = the batch's largest count)."""

    index: torch.Tensor  # (B, n) original position in the prompt; `length` for an empty slot
    valid: torch.Tensor  # (B, n) a real token (not padding, not an empty slot)
    visual: torch.Tensor  # (B, n) a visual token
    length: int  # S, the prompt length

    @classmethod
    def start(cls, visual_mask: torch.Tensor, attention_mask: torch.Tensor) -> "Tokens":
        batch, length = visual_mask.shape
        index = torch.arange(length, device=visual_mask.device).expand(batch, length)
        return cls(index, attention_mask.bool(), visual_mask, length)

    def last(self) -> torch.Tensor:
        """(B,) slot of each sample's last real token (the last prompt token)."""
        order = torch.arange(self.index.shape[1], device=self.index.device)
        return torch.where(self.valid, order, -1).argmax(dim=1)

    def causal_mask(self) -> torch.Tensor:
        """(B, n, n) may-attend: earlier-or-same original position, valid key; every slot sees itself."""
        allowed = (self.index[:, None, :] <= self.index[:, :, None]) & self.valid[:, None, :]
        return allowed | torch.eye(self.index.shape[1], dtype=torch.bool, device=allowed.device)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """values (B, S, ...) at each slot's original position (zeros for empty slots)."""
        padded = torch.nn.functional.pad(values, [0, 0] * (values.dim() - 2) + [0, 1])
        shape = (*self.index.shape, *values.shape[2:])
        index = self.index.view(*self.index.shape, *[1] * (values.dim() - 2)).expand(shape)
        return padded.gather(1, index)

    def scatter(self, full: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`full` (B, S, d) with each slot's values (B, n, d) written back at its original position."""
        padded = torch.nn.functional.pad(full, (0, 0, 0, 1))
        index = self.index[..., None].expand(*self.index.shape, full.shape[-1])
        return padded.scatter(1, index, values.to(full.dtype))[:, : self.length]

    def keep(self, keep: torch.Tensor, hidden: torch.Tensor) -> tuple["Tokens", torch.Tensor]:
        """Only the slots where `keep` (B, n) holds, compacted to the left; and their hidden states."""
        width = int(keep.sum(dim=1).max())
        order = (~keep).long().argsort(dim=1, stable=True)[:, :width]  # kept first, in order
        kept = keep.gather(1, order)
        index = self.index.gather(1, order).masked_fill(~kept, self.length)
        tokens = Tokens(index, self.valid.gather(1, order) & kept, self.visual.gather(1, order) & kept, self.length)
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


# Scorer(layer, layer_input, rope, keys, tokens) → (B, n) visual-token scores from one decoder layer, given its
# input hidden states, rotary embeddings and the keys it cached (B, H_kv, n, head_dim).
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
    frozen: frozenset[int] = frozenset()  # layers where visual tokens are frozen: text-only queries (ShortV)
    recycler: Recycler | None = None  # merges some dropped tokens into a few kept ones (SparseVLM)
    # (config, inputs) → (B,) query rows the scorer computes per sample; None: one (the last prompt token)
    scoring_rows: Callable[[object, dict], torch.Tensor] | None = None
    name: str = "pruned"  # for printing, with `details`
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        # Keeping everything is no drop at all (no scoring either): the off switch is the stock model exactly.
        object.__setattr__(self, "drops", {layer: keep for layer, keep in self.drops.items() if keep < 1})
        if self.drops and self.scorer is None:
            raise ValueError("dropping tokens needs a scorer")
        if any(layer - 1 in self.frozen for layer in self.drops):
            raise ValueError("the layer before a drop scores the tokens, so it cannot be a frozen layer")

    def visual_per_layer(self, config, inputs: dict) -> torch.Tensor:
        """(B, L) visual tokens each sample of a prompt batch runs through each layer."""
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
        """(B,) LLM prefill FLOPs: each layer at its own token count, plus the scoring row before each drop."""
        _, text = prompt_token_counts(config, inputs)
        rows = torch.ones_like(text) if self.scoring_rows is None else self.scoring_rows(config, inputs)
        flops = []
        for text_tokens, visual, score_rows in zip(text.tolist(), self.visual_per_layer(config, inputs).tolist(),
                                                   rows.tolist()):
            tokens = [text_tokens + count for count in visual]
            queries = [text_tokens if layer in self.frozen else n for layer, n in enumerate(tokens)]
            scoring = [(score_rows, tokens[layer - 1]) for layer in sorted(self.drops)]
            width = config.text_config.hidden_size
            recycling = sum(
                self.recycler.flops(visual[layer - 1] - kept_count(visual[layer - 1], keep), width)
                for layer, keep in self.drops.items()
            ) if self.recycler else 0
            flops.append(layerwise_prefill_flops(config, list(zip(queries, tokens)), scoring).total + recycling)
        return torch.tensor(flops)


# ---- the model -------------------------------------------------------------------------------------------------
class PrunedLlava(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OV whose language model drops visual tokens inside the stack according to `plan`."""

    _supports_flash_attn = False  # masks are explicit (B, 1, Q, K) tensors
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def __init__(self, config, plan: PruningPlan):
        super().__init__(config)
        self.plan = plan

    @classmethod
    def sharing(cls, model: LlavaOnevisionForConditionalGeneration, plan: PruningPlan) -> "PrunedLlava":
        """A `PrunedLlava` on `model`'s own parameter and buffer tensors (nothing is copied)."""
        attention = model.config.text_config._attn_implementation
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"in-LLM pruning runs with eager or sdpa attention, not {attention!r}")
        with torch.device("meta"):
            pruned = cls(model.config, plan)
        pruned.load_state_dict(model.state_dict(), strict=True, assign=True)
        for name, buffer in model.named_buffers():
            owner, _, attribute = name.rpartition(".")
            pruned.get_submodule(owner)._buffers[attribute] = buffer
        pruned.generation_config = model.generation_config
        return pruned.train(model.training)

    def __repr__(self) -> str:
        return f"PrunedLlava({self.plan.name}: {self.plan.details})"

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, logits_to_keep=0,
                image_features: list[torch.Tensor] | None = None, **kwargs):
        """Logits as the stock model's; tokens dropped inside the stack keep the hidden state they had then.

        `image_features` (one projected (n_i, d) tensor per image) may replace `pixel_values`, e.g. to time the
        language model alone.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("in-LLM pruning needs input_ids (it finds the visual tokens by the <image> token id)")
        cache = resolve_cache(past_key_values, use_cache, PrunedCache, "in-LLM pruning")
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(length, device=input_ids.device) + past).expand(batch, length)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is not None and cache.is_prefilled:
            hidden = self._decode_layers(input_ids, attention_mask[:, -length:], position_ids, cache)
        else:
            hidden, visual_mask = self._embed(input_ids, pixel_values, image_sizes, image_features)
            hidden = self._prefill_layers(hidden, visual_mask, attention_mask, position_ids,
                                          cache if cache is not None else PrunedCache())
        hidden = self.model.language_model.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep]), past_key_values=cache)

    def _embed(self, input_ids, pixel_values, image_sizes, image_features) -> tuple[torch.Tensor, torch.Tensor]:
        visual_mask = input_ids == self.config.image_token_id
        embeds = self.get_input_embeddings()(input_ids)
        if not visual_mask.any():
            return embeds, visual_mask
        if image_features is None:
            image_features = self.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
        features = torch.cat(list(image_features))
        if features.shape[0] != int(visual_mask.sum()):
            raise ValueError(
                f"{int(visual_mask.sum())} <image> tokens in input_ids but the images give {features.shape[0]}"
            )
        return embeds.masked_scatter(visual_mask[..., None], features.to(embeds.dtype)), visual_mask

    def _prefill_layers(self, hidden, visual_mask, attention_mask, position_ids, cache) -> torch.Tensor:
        tokens = Tokens.start(visual_mask, attention_mask)
        output = hidden
        rotary = self.model.language_model.rotary_emb
        keep = None
        for index, layer in enumerate(self.model.language_model.layers):
            if keep is not None:
                output = tokens.scatter(output, hidden)
                tokens, hidden = tokens.keep(keep, hidden)
                keep = None
            rope = rotary(hidden, tokens.gather(position_ids[..., None])[..., 0])
            if index in self.plan.frozen:
                hidden = _frozen_visual_layer(layer, hidden, tokens, rope, cache)
                continue
            layer_input = hidden
            hidden = layer(hidden, attention_mask=attention_bias(tokens.causal_mask(), hidden.dtype),
                           position_embeddings=rope, past_key_values=cache, use_cache=True)
            cache.valid[index], cache.visual[index] = tokens.valid, tokens.visual & tokens.valid
            if index + 1 in self.plan.drops:
                scores = self.plan.scorer(layer, layer_input, rope, cache.keys[index], tokens)
                keep = select_top(scores, tokens, self.plan.drops[index + 1])
                if self.plan.recycler is not None:
                    keep, hidden = self.plan.recycler(scores, tokens, keep, hidden)
        cache.seen_tokens = visual_mask.shape[1]
        return tokens.scatter(output, hidden)

    def _decode_layers(self, input_ids, new_valid, position_ids, cache: "PrunedCache") -> torch.Tensor:
        """New text tokens through every layer against the pruned cache."""
        if bool((input_ids == self.config.image_token_id).any()):
            raise ValueError("new tokens after the prompt must be text: images go in the first (prefill) call")
        hidden = self.get_input_embeddings()(input_ids)
        rope = self.model.language_model.rotary_emb(hidden, position_ids)
        count = input_ids.shape[1]
        new_valid = new_valid.bool()
        among_new = torch.ones(count, count, dtype=torch.bool, device=hidden.device).tril()
        itself = torch.eye(count, dtype=torch.bool, device=hidden.device)
        for index, layer in enumerate(self.model.language_model.layers):
            cached = cache.valid[index][:, None, :].expand(-1, count, -1)
            allowed = torch.cat([cached, (new_valid[:, None, :] & among_new) | itself], dim=2)
            hidden = layer(hidden, attention_mask=attention_bias(allowed, hidden.dtype), position_embeddings=rope,
                           past_key_values=cache, use_cache=True)
            cache.valid[index] = torch.cat([cache.valid[index], new_valid], dim=1)
            cache.visual[index] = torch.cat([cache.visual[index], torch.zeros_like(new_valid)], dim=1)
        cache.seen_tokens += count
        return hidden

    # ---- cost ---------------------------------------------------------------------------------------------------
    def visual_per_layer(self, inputs: dict) -> torch.Tensor:
        return self.plan.visual_per_layer(self.config, inputs)

    def prefill_flops(self, inputs: dict) -> torch.Tensor:
        return self.plan.prefill_flops(self.config, inputs)


def _frozen_visual_layer(layer, hidden, tokens: Tokens, rope, cache: "PrunedCache") -> torch.Tensor:
    """One stock layer with text-only queries: visual tokens give keys/values (from their frozen states, with
    the layer's own norm and k/v projections, RoPE at their positions) and are not updated."""
    layout = TokenLayout.build(tokens.visual, tokens.valid)
    visual, text = layout.split(hidden)
    (visual_cos, text_cos), (visual_sin, text_sin) = (layout.split(part) for part in rope)
    attention = layer.self_attn
    normed = layer.input_layernorm(visual)
    shape = (*visual.shape[:2], -1, attention.head_dim)
    keys = attention.k_proj(normed).view(shape).transpose(1, 2)
    values = attention.v_proj(normed).view(shape).transpose(1, 2)
    keys, _ = apply_rotary_pos_emb(keys, keys, visual_cos, visual_sin)
    cache.update(keys, values, attention.layer_idx)  # the layer call below appends the text keys
    allowed = torch.cat([layout.cross_mask(), layout.text_mask()], dim=2)
    text = layer(text, attention_mask=attention_bias(allowed, hidden.dtype), position_embeddings=(text_cos, text_sin),
                 past_key_values=cache, use_cache=True)
    cache.valid[attention.layer_idx] = torch.cat([layout.visual_valid, layout.text_valid], dim=1)
    cache.visual[attention.layer_idx] = torch.cat([layout.visual_valid, torch.zeros_like(layout.text_valid)], dim=1)
    return layout.merge(visual, text)


class PrunedCache(Cache):
    """Per layer: the keys/values of the tokens that layer kept (plus decoded tokens) and which are valid."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__(layers=[])
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.valid: dict[int, torch.Tensor] = {}  # (B, keys of that layer)
        self.visual: dict[int, torch.Tensor] = {}  # (B, keys of that layer): a real visual token's key
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"PrunedCache(seen_tokens={self.seen_tokens}, keys per layer={self.key_counts()})"

    @property
    def is_prefilled(self) -> bool:
        return self.seen_tokens > 0

    def nbytes(self) -> dict[str, int]:
        """Bytes of the keys/values allocated, split into real visual tokens' and the rest (text, padding)."""
        visual = total = 0
        for layer, keys in self.keys.items():
            total += 2 * keys.numel() * keys.element_size()
            visual += int(self.visual[layer].sum()) * 2 * keys.shape[1] * keys.shape[3] * keys.element_size()
        return {"visual": visual, "text": total - visual}

    def key_counts(self) -> list[int]:
        return [self.keys[layer].shape[2] for layer in sorted(self.keys)]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions of the original prompt seen so far (dropped tokens included), plus decoded tokens."""
        return self.seen_tokens

    def get_max_length(self) -> int | None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.keys, self.values, self.valid, self.visual):
            for layer in store:
                store[layer] = store[layer].index_select(0, beam_idx.to(store[layer].device))
