"""FastV (Chen et al., ECCV 2024): after layer K keep the visual tokens the last prompt token attends to most.

Layers 0..K-1 run on every token; layer K-1's attention from the last prompt token, averaged over heads, ranks
the visual tokens; layers K.. run on the top `keep` fraction of each sample's visual tokens (and all text).
The score is one attention row per sample: the last token's query (its q projection, RoPE at its position)
against the keys layer K-1 just cached, so no layer needs eager attention or an (S, S) attention matrix.

Reference vs paper (pkunlp-icler/FastV): the paper prunes "after layer K=2" with R=50% (`keep` 0.5) and
writes its FLOPs with a 2-matrix FFN in MACs; the reference's KV-cache variant (lmms-eval) hard-codes K=3,
ratio 0.5 and the LLaVA-1.5 image span `35:611`, ranks only sample 0 (`mean(dim=1)[0]`), and runs layer K-1
twice (once with `output_attentions`), which writes that layer's KV cache twice. Its default HF mode only masks
tokens in attention (no saving). Kept tokens keep their original positions, as here. LLaVA-1.5 has no
`image_newline` tokens; on LLaVA-OV they are visual tokens here, ranked with the rest after layers 0..K-1
have read them, as PyramidDrop's LLaVA-NeXT code does with the whole image span.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from visor.modeling.layers import head_states
from visor.reduction.pruned import PruningPlan, Tokens, check_keep, check_layer, pruned


def last_token_attention(layer, layer_input: torch.Tensor, rope, keys: torch.Tensor, tokens: Tokens,
                         layer_output: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) attention of each sample's last prompt token over its tokens in `layer`, averaged over heads."""
    attention = layer.self_attn
    rows = torch.arange(len(layer_input), device=layer_input.device)
    last = tokens.last()
    query = head_states(attention, "q", layer.input_layernorm(layer_input[rows, last][:, None]))  # (B, H, 1, hd)
    cos, sin = (part[rows, last][:, None] for part in rope)
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    logits = query @ repeat_kv(keys, attention.num_key_value_groups).transpose(2, 3) * attention.scaling
    visible = tokens.valid & (tokens.index <= tokens.index[rows, last][:, None])
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def fastv_plan(config, layer: int = 2, keep: float = 0.5) -> PruningPlan:
    check_keep(keep)
    check_layer(layer, config.text_config.num_hidden_layers)
    return PruningPlan({layer: keep}, last_token_attention, name="fastv", details=dict(layer=layer, keep=keep))


def fastv(model, layer: int = 2, keep: float = 0.5):
    """`model` (a stock model) keeping `keep` of each sample's visual tokens from layer `layer` on."""
    return pruned(model, fastv_plan(model.config, layer, keep))
