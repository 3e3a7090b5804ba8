"""`LayerProbe`: per-layer control of a stock LLaVA-OV language model, for one prompt batch.

The analyses need three things the stock model cannot do by itself, each only in chosen layers:

- **measure**: read the attention weights (eager attention there, SDPA everywhere else, so measuring one
  layer does not slow down or change the numerics of the others);
- **blind**: text tokens cannot attend to image tokens, and image tokens leave the layer unchanged — the
  layer runs on text only, exactly VISOR's text layer (DESIGN.md 2.2), decoding included;
- **read**: text tokens attend to image tokens with the layer's own attention, but image tokens leave the
  layer unchanged — the training-free stand-in for a CA layer (ShortV-style frozen visual tokens).

Layers not named run as in the stock model (SA). The control goes through transformers' attention interface
(`AttentionInterface.register`): inside the probe the text model dispatches to `_probe_attention`, which picks
eager or SDPA per layer and edits the mask of blind layers; a forward hook restores the image tokens' hidden
states after blind and read layers. Outputs are the stock model's when no layer is blind or read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

PROBE_ATTENTION = "visor_probe"
_ACTIVE: ContextVar["LayerProbe | None"] = ContextVar("visor_layer_probe", default=None)

# weights (B, H, Q, K) of a measured layer, with its layer index
WeightsCallback = Callable[[int, torch.Tensor], None]


class LayerProbe:
    """Context manager: run `model` (a stock LLaVA-OV) on batches built from `input_ids` with per-layer kinds.

    `input_ids` are the prompt ids (B, S) the model is called with; `generate()` inside the probe works too
    (new tokens are text). `on_weights(layer, weights)` receives the softmax weights of each `measure` layer.
    """

    def __init__(self, model, input_ids: torch.Tensor, blind: Iterable[int] = (), read: Iterable[int] = (),
                 measure: Iterable[int] = (), on_weights: WeightsCallback | None = None):
        self.language_model = model.model.language_model
        self.blind, self.read, self.measure = set(blind), set(read), set(measure)
        num_layers = len(self.language_model.layers)
        for name, layers in (("blind", self.blind), ("read", self.read), ("measure", self.measure)):
            bad = sorted(layer for layer in layers if not 0 <= layer < num_layers)
            if bad:
                raise ValueError(f"{name} layers {bad} out of range 0..{num_layers - 1}")
        if self.blind & self.read:
            raise ValueError(f"layers {sorted(self.blind & self.read)} cannot be both blind and read")
        if self.measure and on_weights is None:
            raise ValueError("measured layers need an on_weights callback")
        self.on_weights = on_weights
        self.visual = input_ids == model.config.image_token_id  # (B, S) image positions of the prompt
        self._hooks, self._token, self._previous = [], None, None

    def __enter__(self) -> "LayerProbe":
        if _ACTIVE.get() is not None:
            raise RuntimeError("LayerProbe contexts do not nest")
        config = self.language_model.config
        self._previous = config._attn_implementation
        if self._previous not in ("eager", "sdpa"):
            raise ValueError(f"the probe runs models with eager or sdpa attention, not {self._previous!r}")
        config._attn_implementation = PROBE_ATTENTION
        for index in self.blind | self.read:
            self._hooks.append(self.language_model.layers[index].register_forward_hook(self._keep_visual))
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.language_model.config._attn_implementation = self._previous

    def _keep_visual(self, layer, args, output):
        """Image tokens leave a blind or read layer as they came in (only the prefill holds image tokens)."""
        hidden_in = args[0]
        hidden_out = output[0] if isinstance(output, tuple) else output
        if hidden_in.shape[1] != self.visual.shape[1]:
            return output
        kept = torch.where(self.visual[..., None].to(hidden_out.device), hidden_in, hidden_out)
        return (kept, *output[1:]) if isinstance(output, tuple) else kept

    def visual_keys(self, key_length: int) -> torch.Tensor:
        """(B, K) image positions among K keys: the prompt's, then text tokens generated after it."""
        pad = key_length - self.visual.shape[1]
        return torch.nn.functional.pad(self.visual, (0, pad), value=False) if pad > 0 else self.visual[:, :key_length]


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function inside a probe: eager with weights in measured layers, SDPA elsewhere."""
    probe = _ACTIVE.get()
    layer = module.layer_idx
    if probe is not None and layer in probe.blind:
        keys = probe.visual_keys(key.shape[2]).to(query.device)
        queries = keys[:, key.shape[2] - query.shape[2]:]
        blocked = (~queries)[:, None, :, None] & keys[:, None, None, :]  # text query -> image key
        attention_mask = attention_mask.masked_fill(blocked, torch.finfo(attention_mask.dtype).min)
    if probe is None or layer not in probe.measure:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    weights = torch.softmax(scores + attention_mask, dim=-1, dtype=torch.float32).to(query.dtype)
    probe.on_weights(layer, weights)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# Masks inside a probe are the eager kind (additive float, always materialised) so blind layers can edit them.
AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE_ATTENTION, eager_mask)
