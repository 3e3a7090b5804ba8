"""Attention inside the vision tower, read at chosen layers without switching the tower to eager attention.

Pre-LLM methods (VisionZip, HiRED) rank patches by the attention they receive in a vision-encoder layer. Forward
hooks keep that layer's q and k projections while the tower runs with its fast kernel, and the scores are then
computed for just the crops that need them; `received_attention_flops` is their cost (vision side, not LLM).
SigLIP has no [CLS] token, so a patch's score is the attention it receives, averaged over heads and queries.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from visor.backbones import backbone_for


def encoder_layers(model):
    return backbone_for(model.config).vision_layers(model)


def feature_layer_index(model) -> int:
    """The encoder layer whose output the projector reads (the last one when several are concatenated)."""
    return backbone_for(model.config).feature_layer()


@contextmanager
def captured_queries_keys(model, layers: list[int]):
    """{layer: (queries, keys)}, each (crops, heads, patches, head_dim), filled while the vision tower runs."""
    captured, outputs, handles = {}, {}, []
    for layer in layers:
        attention = encoder_layers(model)[layer].self_attn
        for name in ("q_proj", "k_proj"):
            def hook(module, inputs, output, key=(layer, name)):
                outputs[key] = output
            handles.append(getattr(attention, name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        head_dim = encoder_layers(model)[layer].self_attn.head_dim
        crops, patches, _ = outputs[layer, "q_proj"].shape
        captured[layer] = tuple(outputs[layer, name].view(crops, patches, -1, head_dim).transpose(1, 2)
                                for name in ("q_proj", "k_proj"))


def received_attention(model, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(crops, patches): the attention each patch receives, averaged over heads and queries."""
    scale = encoder_layers(model)[layer].self_attn.scale
    return (queries @ keys.transpose(2, 3) * scale).softmax(dim=-1).mean(dim=(1, 2))


def received_attention_flops(config, crops: int) -> int:
    """The q·kᵀ products of `received_attention` over `crops` crops (softmax and means are ignored)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return crops * 2 * patches * patches * vision.hidden_size
