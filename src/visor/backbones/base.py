"""`Backbone`: what VISOR's engine, the FLOP counter and the baselines ask of a model family.

An adapter is built from a (stock or VISOR) config of its family. Model-side methods take the model they are
about; geometry and cost methods need only the config, so FLOPs are counted without building a model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


# Every family's image and video arguments of `forward` (`visor.modeling.visor.VisorModel.forward` names them all).
IMAGE_ARGUMENTS = ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw", "mm_token_type_ids",
                   "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """A linear layer on `tokens` tokens: 2 · tokens · in · out (`visor.flops` conventions)."""
    return 2 * tokens * in_features * out_features


def vit_layer_flops(tokens: int, width: int, intermediate_size: int) -> int:
    """One ViT encoder layer (SigLIP's, InternViT's) over `tokens` tokens: q, k, v, o, attention scores and values
    over all heads (heads × head_dim = width), and the fc1 / fc2 MLP."""
    return (4 * linear_flops(tokens, width, width) + 2 * 2 * tokens * tokens * width
            + 2 * linear_flops(tokens, width, intermediate_size))


def sequential_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """One rotary position per token, (B, S), as the stock 1-D families compute them (they ignore padding here too)."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(*input_ids.shape)


def selected_layer(vision_feature_layer: int | list[int], num_hidden_layers: int) -> int:
    """Index into the vision layers of the one whose output `vision_feature_layer` selects (the last, if several)
    from the tower's hidden states, whose first is the embeddings' output."""
    feature = vision_feature_layer if isinstance(vision_feature_layer, int) else vision_feature_layer[-1]
    return feature % (num_hidden_layers + 1) - 1


class ImageTokens(NamedTuple):
    crops: int  # image pieces through the vision tower
    visual_tokens: int  # tokens the language model sees for the image


# What a stock decoder layer may hold: VISOR's engine runs its attention and MLP itself, around these two norms.
DECODER_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


class Backbone:
    """One model family; a subclass defines every method below.

    The text-model contract (docs/architecture.md, "The text-model contract"), which VISOR's layer engine, the CA
    blocks and the in-LLM reductions rely on, is checked for every family: from the config when the adapter is
    built (`check_text_config`), on the modules when a VISOR or pruned model is (`check_text_model`).
    """

    stock_model_class: type  # the family's transformers class
    image_inputs: tuple[str, ...]  # the stock forward's image arguments besides `pixel_values`
    video_inputs: tuple[str, ...] = ()  # the stock forward's video arguments the adapter reads (none: video refused)
    # The stock video processor whose settings `visor.data.processor` reads to prepare frames as it does (every
    # family with `video_inputs` names one), and the frames a video keeps when those settings do not say (a family
    # whose stock video processor samples otherwise, as Qwen2.5-VL's and Qwen3-VL's, has none).
    video_processor_name: str | None = None
    default_video_frames: int
    image_processor_class: type  # the family's stock PIL image processor (`visor.data.processor` loads its settings)

    def __init__(self, config):
        self.config = config
        self.check_text_config()

    def check_text_config(self) -> None:
        """Every layer full causal attention (no sliding window, no per-layer attention types) and one rotary
        embedding over the whole head; a ValueError names what differs."""
        text = self.config.text_config
        if getattr(text, "use_sliding_window", False):
            raise ValueError("VISOR does not support sliding-window attention in the text model (use_sliding_window)")
        kinds = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]) - {"full_attention"})
        if kinds:
            raise ValueError(f"VISOR runs full causal attention in every text layer; this text model has {kinds} "
                             "layers (layer_types)")
        rope = getattr(text, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"VISOR rotates the whole attention head; this text model rotates {partial} of it "
                             "(partial_rotary_factor)")

    def check_text_model(self, model) -> None:
        """The text stack's modules as the engine runs them: a `rotary_emb`, and decoder layers of q/k/v/o
        projections (heads x head_dim wide), an MLP and two RMSNorms with `variance_epsilon` and a multiplicative
        `weight` (`input_layernorm`, `post_attention_layernorm`), nothing else; a ValueError names what differs."""
        stack = self.language_model(model)
        if not hasattr(stack, "rotary_emb"):
            raise ValueError(f"{type(stack).__name__} has no rotary_emb: VISOR needs one rotary embedding for all layers")
        for index, layer in enumerate(stack.layers):
            where = f"text layer {index} ({type(layer).__name__})"
            extra = sorted(name for name, _ in layer.named_children() if name not in DECODER_LAYER_PARTS)
            if extra:
                raise ValueError(f"{where} holds {extra} besides {sorted(DECODER_LAYER_PARTS)}: VISOR's engine "
                                 "would skip them")
            attention = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(attention, name, None), nn.Linear):
                    raise ValueError(f"{where}: its attention has no linear {name}")
            if attention.q_proj.out_features % attention.head_dim:
                raise ValueError(f"{where}: q_proj's {attention.q_proj.out_features} outputs are not whole heads of "
                                 f"{attention.head_dim}")
            for name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, name)
                if not (type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
                        and isinstance(getattr(norm, "weight", None), nn.Parameter)):
                    raise ValueError(f"{where}: {name} is a {type(norm).__name__}, not an RMSNorm with "
                                     "variance_epsilon and a multiplicative weight")

    def language_model(self, model) -> nn.Module:
        """The text stack: `embed_tokens`, `layers` (the stock decoder layers), `rotary_emb` and `norm`."""
        raise NotImplementedError

    def prompt_positions(self, model, input_ids, attention_mask, **image_inputs) -> torch.Tensor:
        """Rotary positions of a whole prompt (B, S), as the stock model computes them: (B, S), or
        (sections, B, S) for multi-axis rotary positions."""
        raise NotImplementedError

    def caller_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids a caller passed (`generate` passes its own) in the form `prompt_positions` returns."""
        return position_ids

    def positions(self, model, input_ids, attention_mask, cache, position_ids=None, **image_inputs) -> torch.Tensor:
        """Rotary positions of this call's tokens: the caller's if given, else the prompt's, else (new tokens
        after a prefilled cache) the positions after the prompt's last. A prompt's positions can run ahead of or
        behind its length (multi-axis positions advance less per image token; `generate` counts real tokens only),
        so the cache keeps each sample's offset, whoever computed the prompt's positions."""
        prefilled = cache is not None and cache.is_prefilled
        if position_ids is not None:
            position_ids = self.caller_positions(position_ids)
        elif prefilled:
            new = torch.arange(input_ids.shape[1], device=input_ids.device) + cache.get_seq_length()
            return new + cache.position_offset
        else:
            position_ids = self.prompt_positions(model, input_ids, attention_mask, **image_inputs)
        if cache is not None and not prefilled:
            last = position_ids.reshape(-1, *position_ids.shape[-2:]).amax(dim=(0, 2))
            cache.position_offset = (last + 1 - input_ids.shape[1])[:, None]
        return position_ids

    def select_image_inputs(self, **arguments) -> dict:
        """The image and video arguments of a forward call that this family reads (`pixel_values`, `image_inputs`
        and `video_inputs`), from the call's keyword arguments; an image or video argument it does not read, given
        anyway, is an error rather than silently ignored."""
        names = ("pixel_values", *self.image_inputs, *self.video_inputs)
        stray = sorted(name for name, value in arguments.items() if value is not None and name not in names
                       and (name in IMAGE_ARGUMENTS or "video" in name))
        if stray:
            raise ValueError(f"{type(self).__name__} models take no {', '.join(stray)}")
        return {name: arguments.get(name) for name in names}

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: the slots that hold visual features, the image token's and, in a family that reads video,
        the video token's. Every stream, mask and cache treats both alike."""
        ids = [self.config.image_token_id] + ([self.config.video_token_id] if self.video_inputs else [])
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def encode_images(self, model, num_image_tokens: int, **image_inputs) -> list[torch.Tensor]:
        """The stock vision tower, projector and packing: one (n_i, d) tensor per image, in prompt order; a
        ValueError names missing or malformed inputs (`num_image_tokens`: the prompt's, for the message)."""
        raise NotImplementedError

    def encode_videos(self, model, num_video_tokens: int, **video_inputs) -> list[torch.Tensor]:
        """The stock video path (a family with `video_inputs`): one (n_v, d) tensor per video, in prompt order,
        for the video token's slots (with DeepStack (1 + K, n_v, d), as `embed_with_images` reads it); a
        ValueError names missing or malformed inputs."""
        raise NotImplementedError

    def default_image_processor(self):
        """The family's stock image processor with the settings its released checkpoints use, for a model that
        comes without a preprocessor config (its first docstring line says which settings)."""
        raise NotImplementedError

    def image_tokens(self, image_size: tuple[int, int], alone: bool = True) -> ImageTokens:
        """Crops and visual tokens of one (height, width) image, as the stock model computes them (`alone`: the
        only image of its prompt; LLaVA-OV tiles only those)."""
        raise NotImplementedError

    def largest_image_size(self) -> tuple[int, int]:
        """The (height, width) of the largest image the family's processor makes (a reference prompt)."""
        raise NotImplementedError

    def vision_flops(self, image_size: tuple[int, int]) -> dict[str, int]:
        """FLOPs of the vision tower and the projector on one (height, width) image, by part (`visor.flops`
        conventions)."""
        raise NotImplementedError

    def video_tokens(self, frames: int) -> ImageTokens:
        """Frames through the vision tower and visual tokens of one video of `frames` frames, as the stock model
        computes them (a family with `video_inputs`). Asked of a family without it, a ValueError names the family:
        everything that counts or benches a video asks this first."""
        reads = "reads video but its adapter" if self.video_inputs else "takes no video and"
        raise ValueError(f"{type(self).__name__} {reads} has no video geometry (Backbone.video_tokens)")

    def video_layout(self, frames: int) -> list[int]:
        """The lengths of the unbroken runs of video tokens that one video of `frames` nominal frames makes in a
        prompt, in order (text stands between them where the family's processor writes some): one run of all its
        `video_tokens`."""
        return [self.video_tokens(frames).visual_tokens]

    def video_vision_flops(self, frames: int) -> dict[str, int]:
        """FLOPs of the vision tower and the projector on one video of `frames` frames, by part (a family with
        `video_inputs`)."""
        raise NotImplementedError

    def nominal_video_inputs(self, frames: int) -> dict:
        """The video arguments besides `pixel_values_videos` of a prompt whose one video of `frames` frames, at the
        family's default frame resolution, comes as precomputed features (what positions need; a family with
        `video_inputs`, the video `video_tokens` and `video_vision_flops` count)."""
        raise NotImplementedError

    def nominal_video_pixel_inputs(self, frames: int) -> dict:
        """Random pixels of that same video, as `encode_videos` takes them: the vision work `video_vision_flops`
        counts, to time it."""
        raise NotImplementedError

    def nominal_vision_flops(self, visual_tokens: int) -> dict[str, int]:
        """`vision_flops` of an image known only by its visual-token count (a benchmark's sweep): the family
        says which image that stands for."""
        raise NotImplementedError

    def nominal_image_inputs(self, visual_tokens: int) -> dict:
        """The image arguments besides `pixel_values` of a prompt whose one image of `visual_tokens` tokens comes
        as precomputed features (what positions need; the same image as `nominal_vision_flops`)."""
        raise NotImplementedError

    def nominal_pixel_inputs(self, visual_tokens: int) -> dict:
        """Random pixels of that same image, as `encode_images` takes them: the vision work `nominal_vision_flops`
        counts, to time it. A ValueError when the family has no such image."""
        raise NotImplementedError

    def nominal_visual_tokens(self, visual_tokens: int) -> int:
        """Visual tokens the language model sees for `nominal_pixel_inputs(visual_tokens)`: exactly N where the
        family has an image of N tokens; a family whose packing changes the count says how."""
        return visual_tokens

    def vision_tower(self, model) -> nn.Module:
        raise NotImplementedError

    def vision_layers(self, model) -> nn.ModuleList:
        """The vision encoder's layers, whose attention pre-LLM reductions read."""
        raise NotImplementedError

    def feature_layer(self) -> int:
        """Index into `vision_layers` of the layer whose output the projector reads (the last one if several)."""
        raise NotImplementedError
