"""KV caches of the project's layer loops (`LayerLoopCache`: a `Cache` that `generate()` accepts, that counts the
original sequence's positions itself, as a layer may hold fewer keys than positions seen, and reports the bytes it
allocated, visual and text), and VISOR's: visual keys/values only where a sample reads vision.

`VisorCache` holds, per layer,
- text keys/values for every sample (prompt text, then each generated token);
- visual keys/values of the *SA* layer for the samples whose configuration ran it (a sub-batch tensor);
- the CA block's keys/values over the visual tokens, computed once at prefill, for CA layers.
Layers that a sample ran as text-only keep nothing visual for it, so the visual part of the cache shrinks by
about L / (|CA| + |SA used|). Keys are stored after RoPE, so their order inside the cache does not matter:
masks carry validity (padding) and the decoded tokens' causality.

The decoder layers are the stock ones: they call `past_key_values.update(k, v, layer_idx)`. The model hands
each layer call a `LayerCacheView` for the rows it runs, which files the new keys where they belong and
returns the keys those rows may attend to.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from visor.modeling.layout import TokenLayout


class LayerLoopCache(Cache):
    """What the project's layer loops share (see the module docstring)."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__(layers=[])
        self.seen_tokens = 0
        self.position_offset: torch.Tensor | int = 0  # (B, 1): a new token's position minus its index (`Backbone.positions`)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"

    @property
    def is_prefilled(self) -> bool:
        return self.seen_tokens > 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions of the original sequence seen so far (the whole prompt, plus decoded tokens)."""
        return self.seen_tokens

    def get_max_length(self) -> int | None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search): row i takes old row beam_idx[i]."""
        if isinstance(self.position_offset, torch.Tensor):
            self.position_offset = self.position_offset.index_select(0, beam_idx.to(self.position_offset.device))

    def nbytes(self) -> dict[str, int]:
        """Bytes of the tensors actually allocated: {"visual": …, "text": …}."""
        raise NotImplementedError


def _bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class VisorCache(LayerLoopCache):
    """Sparse KV cache for VISOR models (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.text_keys: dict[int, torch.Tensor] = {}
        self.text_values: dict[int, torch.Tensor] = {}
        self.visual_keys: dict[int, torch.Tensor] = {}
        self.visual_values: dict[int, torch.Tensor] = {}
        self.visual_rows: dict[int, torch.Tensor] = {}
        self.cross_keys: dict[int, torch.Tensor] = {}
        self.cross_values: dict[int, torch.Tensor] = {}
        self.text_valid: torch.Tensor | None = None  # (B, Nt_total)
        self.visual_valid: torch.Tensor | None = None  # (B, Nv)
        self.sa_layers: torch.Tensor | None = None  # (B, L) fixed at prefill
        self.configuration: torch.Tensor | None = None  # (B,) the configuration each sample runs

    def __len__(self) -> int:
        return len(self.text_keys)

    def nbytes(self) -> dict[str, int]:
        visual = [*self.visual_keys.values(), *self.visual_values.values(),
                  *self.cross_keys.values(), *self.cross_values.values()]
        return {"visual": _bytes(visual), "text": _bytes([*self.text_keys.values(), *self.text_values.values()])}

    # ---- prefill -------------------------------------------------------------------------------------------
    def start(self, layout: TokenLayout, sa_layers: torch.Tensor) -> None:
        self.text_valid = layout.text.valid
        self.visual_valid = layout.visual.valid
        self.sa_layers = sa_layers
        self.seen_tokens = layout.length

    def store_cross(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.cross_keys[layer], self.cross_values[layer] = keys, values

    # ---- decoding --------------------------------------------------------------------------------------------
    def extend(self, new_valid: torch.Tensor) -> None:
        """Make room for `n` new text tokens per sample in every layer (filled by the layer calls)."""
        count = new_valid.shape[1]
        self.text_valid = torch.cat([self.text_valid, new_valid.bool()], dim=1)
        for store in (self.text_keys, self.text_values):
            for layer, tensor in store.items():
                batch, heads, _, dim = tensor.shape
                store[layer] = torch.cat([tensor, tensor.new_zeros(batch, heads, count, dim)], dim=2)
        self.seen_tokens += count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for store in (self.text_keys, self.text_values, self.cross_keys, self.cross_values):
            for layer in store:
                store[layer] = store[layer].index_select(0, beam_idx.to(store[layer].device))
        for layer, rows in self.visual_rows.items():
            # Old row r sits at slot position_of[r] in the sub-batch tensor.
            position_of = torch.full((self.sa_layers.shape[0],), -1, dtype=torch.long, device=rows.device)
            position_of[rows] = torch.arange(len(rows), device=rows.device)
            slots = position_of[beam_idx.to(rows.device)]
            keep = slots >= 0
            self.visual_keys[layer] = self.visual_keys[layer].index_select(0, slots[keep])
            self.visual_values[layer] = self.visual_values[layer].index_select(0, slots[keep])
            self.visual_rows[layer] = keep.nonzero().squeeze(1)
        self.text_valid = self.text_valid.index_select(0, beam_idx.to(self.text_valid.device))
        self.visual_valid = self.visual_valid.index_select(0, beam_idx.to(self.visual_valid.device))
        self.sa_layers = self.sa_layers.index_select(0, beam_idx.to(self.sa_layers.device))
        self.configuration = self.configuration.index_select(0, beam_idx.to(self.configuration.device))


class LayerCacheView:
    """What one stock layer call sees as `past_key_values`: the cache of layer `layer` for rows `rows`.

    Prefill: a call over the full sequence (SA rows, `sa_layout` = their token layout) has its keys split
    into visual and text parts; a text-only call files text keys. Decoding: the new text keys go into the
    slots `VisorCache.extend` made, and the call gets back the rows' cached visual keys (if `runs_sa`)
    followed by their text keys.
    """

    def __init__(self, cache: VisorCache, layer: int, rows: torch.Tensor, prefill: bool,
                 runs_sa: bool = False, sa_layout: TokenLayout | None = None):
        self.cache, self.layer, self.rows, self.prefill = cache, layer, rows, prefill
        self.runs_sa = runs_sa or sa_layout is not None
        self.sa_layout = sa_layout

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        cache, layer, rows = self.cache, self.layer, self.rows
        if self.prefill:
            text_keys, text_values = keys, values
            if self.sa_layout is not None:
                visual_keys, text_keys = self.sa_layout.split(keys.transpose(1, 2))
                visual_values, text_values = self.sa_layout.split(values.transpose(1, 2))
                cache.visual_keys[layer] = visual_keys.transpose(1, 2).contiguous()
                cache.visual_values[layer] = visual_values.transpose(1, 2).contiguous()
                cache.visual_rows[layer] = rows
                text_keys, text_values = text_keys.transpose(1, 2), text_values.transpose(1, 2)
            self._write_text(text_keys, text_values, start=0)
            return keys, values

        count = keys.shape[2]
        self._write_text(keys, values, start=cache.text_keys[layer].shape[2] - count)
        text_keys, text_values = cache.text_keys[layer][rows], cache.text_values[layer][rows]
        if not self.runs_sa:
            return text_keys, text_values
        return (torch.cat([cache.visual_keys[layer], text_keys], dim=2),
                torch.cat([cache.visual_values[layer], text_values], dim=2))

    def _write_text(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        cache, layer = self.cache, self.layer
        if layer not in cache.text_keys:
            batch = cache.sa_layers.shape[0]
            shape = (batch, keys.shape[1], keys.shape[2], keys.shape[3])
            cache.text_keys[layer], cache.text_values[layer] = keys.new_zeros(shape), values.new_zeros(shape)
        end = start + keys.shape[2]
        cache.text_keys[layer][self.rows, :, start:end] = keys
        cache.text_values[layer][self.rows, :, start:end] = values


def resolve_cache(past_key_values, use_cache: bool, cache_class: type[Cache], user: str) -> Cache | None:
    """The cache a custom layer loop fills or reads. `generate()` hands over an empty stock cache, which is
    swapped for a `cache_class`; any other cache cannot hold what the loop stores (`user` names the loop)."""
    if isinstance(past_key_values, cache_class):
        return past_key_values
    if past_key_values is not None:
        if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
            return cache_class()
        raise ValueError(f"{user} needs a {cache_class.__name__} (or an empty cache), "
                         f"got {type(past_key_values).__name__}")
    return cache_class() if use_cache else None
