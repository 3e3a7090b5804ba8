"""The cross-attention (CA) block: text queries read every visual token; visual tokens are not changed.

One block sits in front of each CA layer. Its projections are shaped like the host layer's
attention (same heads, GQA groups, biases), so it can start from two places:

- `zero` (default): fresh weights behind a tanh gate initialised at 0, so the converted model starts exactly
  as the text-only model and learns how much vision to let in (as Llama-3.2-Vision's cross-attention);
- `host`: copies the host layer's q/k/v/o and input norm, so text queries look at the image the way the
  original layer did (ShortV's training-free start); pair it with `cross_attention_gate=False`.

`key_value_heads` may give the block fewer key/value heads than its host (GQA uptraining's mean-pooled
heads, Ainslie et al. 2023, when starting from the host): projecting every visual token to keys and values is
most of a CA block's cost when the model's own GQA ratio is small.

A text row that sees no visual token (a prompt with the image after the question) gets exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from visor.modeling.layout import attention_bias


class GatedMLP(nn.Module):
    """A small SwiGLU MLP (optional, after the cross-attention), with its own norm."""

    def __init__(self, hidden_size: int, intermediate_size: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return self.down_proj(nn.functional.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class CrossAttentionBlock(nn.Module):
    """T ← T + tanh(g) · CA(norm(T), norm(V)) [+ tanh(g_mlp) · MLP(T)]."""

    is_causal = False  # read by transformers' SDPA wrapper; the mask carries the prompt order
    # The attention kernels see one query "head" per key/value head: queries of a GQA group are folded into the
    # query length (CA has no causal structure among queries), so the visual keys are never repeated per head.
    num_key_value_groups = 1

    def __init__(self, host_layer: nn.Module, config, gate: bool = True, mlp: bool = False, rope: bool = True,
                 key_value_heads: int | None = None):
        super().__init__()
        host = host_layer.self_attn
        hidden_size = config.hidden_size
        self.config = config
        self.layer_idx = host.layer_idx
        self.head_dim = host.head_dim
        self.num_heads = host.q_proj.out_features // host.head_dim
        host_key_value_heads = self.num_heads // host.num_key_value_groups
        self.num_key_value_heads = key_value_heads or host_key_value_heads
        if host_key_value_heads % self.num_key_value_heads:
            raise ValueError(f"cross-attention key/value heads ({self.num_key_value_heads}) must divide the host "
                             f"layer's {host_key_value_heads}, so each pools a whole group of them")
        self.query_groups = self.num_heads // self.num_key_value_heads
        self.scaling = host.scaling
        self.use_rope = rope

        norm_class = type(host_layer.input_layernorm)
        eps = host_layer.input_layernorm.variance_epsilon
        self.text_norm = norm_class(hidden_size, eps=eps)
        self.visual_norm = norm_class(hidden_size, eps=eps)
        self.q_proj = _like(host.q_proj)
        self.k_proj = _like(host.k_proj, self.num_key_value_heads * self.head_dim)
        self.v_proj = _like(host.v_proj, self.num_key_value_heads * self.head_dim)
        self.o_proj = _like(host.o_proj)
        # Per-head query/key norms where the host has them (Qwen3).
        self.q_norm, self.k_norm = (_norm_like(getattr(host, name, None)) for name in ("q_norm", "k_norm"))
        self.attention_gate = nn.Parameter(torch.zeros(1)) if gate else None
        self.mlp = None
        self.mlp_gate = None
        if mlp:
            self.mlp = GatedMLP(hidden_size, max(1, config.intermediate_size // 4), norm_class(hidden_size, eps=eps))
            self.mlp_gate = nn.Parameter(torch.zeros(1)) if gate else None

    @torch.no_grad()
    def copy_host(self, host_layer: nn.Module) -> None:
        """Start from the host layer's own attention (the `host` initialisation); with fewer key/value heads
        than the host, each starts as the mean of the host heads it replaces."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            target, source = getattr(self, name), getattr(host_layer.self_attn, name)
            target.weight.copy_(self._pool_heads(source.weight, target.out_features))
            if target.bias is not None:
                target.bias.copy_(self._pool_heads(source.bias, target.out_features))
        self.text_norm.weight.copy_(host_layer.input_layernorm.weight)
        self.visual_norm.weight.copy_(host_layer.input_layernorm.weight)
        for name in ("q_norm", "k_norm"):
            if getattr(self, name) is not None:
                getattr(self, name).weight.copy_(getattr(host_layer.self_attn, name).weight)

    def _pool_heads(self, weight: torch.Tensor, out_features: int) -> torch.Tensor:
        """Mean over each group of consecutive host heads along the output dimension (identity if sizes match)."""
        if weight.shape[0] == out_features:
            return weight
        pooled = weight.reshape(out_features // self.head_dim, -1, self.head_dim, *weight.shape[1:])
        return pooled.mean(dim=1).reshape(out_features, *weight.shape[1:])

    def visual_keys_values(
        self,
        visual: torch.Tensor,
        visual_rope: tuple[torch.Tensor, torch.Tensor] | None,
        visual_unit: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values over the visual tokens (B, H_kv, Nv, head_dim): computed once, cached for decoding
        (RoPE at the visual positions when the block uses it and `visual_rope` is given: (cos, sin)).

        `visual_unit` = `rms_unit(visual)` may be passed in: it is the same for every CA block until an SA
        layer changes the visual tokens, and the norm's weight folds into the projections, so the thousands of
        visual tokens are normalised once rather than once per block.
        """
        keys, values = self.project_visual(visual, visual_unit)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        if self.use_rope and visual_rope is not None:
            keys = _rotate(keys, visual_rope)
        return keys, values

    def project_visual(self, visual: torch.Tensor, visual_unit: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of visual tokens (..., N, d) before RoPE: (..., N, H_kv, head_dim)."""
        if visual_unit is None:
            visual_unit = rms_unit(visual, self.visual_norm.variance_epsilon)
        scale = self.visual_norm.weight.to(visual_unit.dtype)[None, :]
        shape = (*visual.shape[:-1], self.num_key_value_heads, self.head_dim)  # explicit: N may be 0
        keys = nn.functional.linear(visual_unit, self.k_proj.weight * scale, self.k_proj.bias).view(shape)
        values = nn.functional.linear(visual_unit, self.v_proj.weight * scale, self.v_proj.bias).view(shape)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        return keys, values

    def project_queries(self, text: torch.Tensor) -> torch.Tensor:
        """Queries of text tokens (..., N, d) before RoPE: (..., N, H, head_dim)."""
        query = self.q_proj(self.text_norm(text)).view(*text.shape[:-1], self.num_heads, self.head_dim)
        return query if self.q_norm is None else self.q_norm(query)

    def add(self, text: torch.Tensor, attended: torch.Tensor | None, sees_visual: torch.Tensor | None = None
            ) -> torch.Tensor:
        """The block's output on `text` given what its queries read (..., N, H * head_dim; None: nothing to read;
        `sees_visual` (..., N): False where a row read nothing, whose output is exactly zero): the gated projection
        of it and the gated MLP, added to the text stream."""
        if attended is not None:
            update = self.o_proj(attended)
            if sees_visual is not None:
                update = update * sees_visual[..., None].to(update.dtype)
            text = text + _gated(update, self.attention_gate)
        if self.mlp is not None:
            text = text + _gated(self.mlp(text), self.mlp_gate)
        return text

    def forward(
        self,
        text: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor,
        text_rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """text (B, Nt, d), visual keys/values from `visual_keys_values`, allowed (B, Nt, Nv) bool → new text."""
        if keys.shape[2] == 0:
            return self.add(text, None)
        return self.add(text, self._attend(text, keys, values, allowed, text_rope), allowed.any(dim=-1))

    def _attend(self, text, keys, values, allowed, text_rope) -> torch.Tensor:
        batch, text_len, _ = text.shape
        query = self.project_queries(text).transpose(1, 2)
        if self.use_rope:
            query = _rotate(query, text_rope)
        sees_visual = allowed.any(dim=-1)  # (B, Nt)
        # Rows with nothing to read attend everywhere (finite softmax) and are zeroed below: never NaN.
        bias = attention_bias(allowed | ~sees_visual[..., None], query.dtype)
        # Fold each GQA group's queries into the query length: (B, H, Nt, D) -> (B, H_kv, groups * Nt, D).
        groups, kv_heads = self.query_groups, self.num_key_value_heads
        query = query.reshape(batch, kv_heads, groups * text_len, self.head_dim)
        bias = bias[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * text_len, -1)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attended, _ = attend(self, query, keys, values, bias, dropout=0.0, scaling=self.scaling)
        # (B, groups * Nt, H_kv, D) -> (B, Nt, H_kv * groups * D), heads in the stock order (kv head, group).
        attended = attended.reshape(batch, groups, text_len, kv_heads, self.head_dim).permute(0, 2, 3, 1, 4)
        return attended.reshape(batch, text_len, -1)


def rms_unit(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without the weight, computed in fp32 as the stock RMSNorm does."""
    as_float = hidden.float()
    return (as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


def _rotate(states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on one tensor (B, H, N, head_dim) with the positions' (cos, sin)."""
    rotated, _ = apply_rotary_pos_emb(states, states, *rope)
    return rotated


def _like(linear: nn.Linear, out_features: int | None = None) -> nn.Linear:
    return nn.Linear(linear.in_features, out_features or linear.out_features, bias=linear.bias is not None)


def _norm_like(norm: nn.Module | None) -> nn.Module | None:
    return None if norm is None else type(norm)(norm.weight.shape[0], eps=norm.variance_epsilon)


def _gated(update: torch.Tensor, gate: nn.Parameter | None) -> torch.Tensor:
    return update if gate is None else torch.tanh(gate).to(update.dtype) * update
