"""`VisorModel`: a vision-language model whose language model meets vision only where asked.

Each backbone adapter defines its family's VISOR class as `class Visor…(VisorModel, <the family's stock
model class>)`: the same vision tower, projector, decoder layers and state-dict names (a stock checkpoint loads
as is), a few new modules (the CA blocks, the CPE, the router) and this class's own decoder-layer loop. Each
layer of the text model runs as one of three kinds (`visor.modeling.layers`):

    SA    the stock layer over [V; T] in the original order, mask and positions   (visual tokens updated)
    CA    T ← T + CA(T, V), then the stock layer over T only                        (visual tokens unchanged)
    text  the stock layer over T only                                               (visual tokens unchanged)

Which layers are SA is chosen per sample (`configuration=`); at an SA layer the samples that run it go
through the full layer together and the rest through the text-only path, then both are scattered back. One loop
(`_run_layers`) applies this rule to a whole prompt (prefill) and to new tokens against the cache (decoding).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from visor.config import ROUTER_MODES
from visor.modeling.cache import LayerCacheView, VisorCache, resolve_cache
from visor.modeling.choice import ConfigurationChoice, per_sample_indices
from visor.modeling.cross_attention import CrossAttentionBlock, rms_unit
from visor.modeling.layers import run_layer, split_rope
from visor.modeling.layout import TokenLayout, attention_bias
from visor.modeling.position_encoding import ConditionalPositionEncoding
from visor.modeling.router import ConfigurationRouter, check_threshold

SUPPORTED_ATTENTION = ("eager", "sdpa")
NEW_MODULES = ("cross_attention", "position_encoding", "router")  # what VISOR adds to the stock model
NEEDS_INPUT_IDS = "VISOR needs input_ids (it finds the visual tokens by the <image> and <video> token ids)"
NEW_TOKENS_ARE_TEXT = "new tokens after the prompt must be text: images and videos go in the first (prefill) call"


@dataclass
class VisorOutput(CausalLMOutputWithPast):
    """The stock causal-LM output plus `configuration`: (B,) the configuration each sample ran."""

    configuration: torch.LongTensor | None = None


class VisorModel:
    """VISOR's part of a family's VISOR class; the class sets `backbone_class` (its `visor.backbones` adapter)."""

    backbone_class: type
    _supports_flash_attn = False  # masks are explicit (B, 1, Q, K) tensors; flash kernels take none
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        share_checkpoint_layout(cls)

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.backbone_class(config)
        self.backbone.check_text_model(self)
        layers = self.text_stack.layers
        self.cross_attention = nn.ModuleDict({
            str(layer): CrossAttentionBlock(layers[layer], config.text_config, gate=config.cross_attention_gate,
                                            mlp=config.cross_attention_mlp, rope=config.cross_attention_rope,
                                            key_value_heads=config.cross_attention_key_value_heads)
            for layer in config.cross_attention_layers
        })
        self.position_encoding = (ConditionalPositionEncoding(config.text_config.hidden_size,
                                                              config.position_encoding_kernel)
                                  if config.position_encoding else None)
        self.router = ConfigurationRouter(config) if config.has_router else None
        self.post_init()

    @property
    def text_stack(self) -> nn.Module:
        """The stock text model (embeddings, decoder layers, rotary embedding, final norm)."""
        return self.backbone.language_model(self)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers' `from_pretrained`, for local VISOR folders only, strictly: a broken folder, or weights
        that do not fit the config, raise ValueError. A stock folder is refused (`from_stock` converts one)."""
        return load_strictly(super().from_pretrained, "VISOR", cls.config_class.model_type,
                             pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_stock(cls, stock, visor_config=None, **config_options):
        """Build VISOR around a stock model of the family (or a local checkpoint folder), reusing all its weights.

        A folder is read straight into the VISOR model by transformers' loader (one copy of the weights in memory,
        none random but the new modules); a model in memory is copied into a new VISOR model. The new modules start
        as documented in their modules: gated CA blocks and CPE are no-ops, or the CA blocks copy their host
        layer's attention when `cross_attention_init="host"` (the random draws of a fresh router or ungated CA
        block differ between the two ways, not their distributions).
        """
        stock_class = cls.backbone_class.stock_model_class
        in_memory = isinstance(stock, stock_class)
        if not in_memory:
            check_model_type(stock, stock_class.config_class.model_type)
        stock_config = stock.config if in_memory else stock_class.config_class.from_pretrained(
            stock, local_files_only=True)
        if visor_config is None:
            visor_config = cls.config_class.from_stock_config(stock_config, **config_options)
        elif config_options:
            raise ValueError("pass either visor_config or config options, not both")
        if in_memory:
            visor_config._attn_implementation = stock.config.text_config._attn_implementation
            model = cls(visor_config).to(dtype=stock.dtype, device=stock.device)
            missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
            missing = [key for key in missing if not key.startswith(tuple(f"{name}." for name in NEW_MODULES))]
            if missing or unexpected:
                raise ValueError(f"the stock weights do not fit this VISOR config: missing {missing}, "
                                 f"unexpected {unexpected}")
            model.train(stock.training)
        else:
            model = load_strictly(super().from_pretrained, stock_class.__name__, stock_class.config_class.model_type,
                                  stock, config=visor_config, may_lack=NEW_MODULES)
        if visor_config.cross_attention_init == "host":  # the rest of the new modules start as `_init_weights` left them
            with torch.no_grad():
                for layer, block in model.cross_attention.items():
                    block.copy_host(model.text_stack.layers[int(layer)])
        return model

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CrossAttentionBlock):
            for gate in (module.attention_gate, module.mlp_gate):
                if gate is not None:
                    nn.init.zeros_(gate)
            for norm in (module.text_norm, module.visual_norm, module.q_norm, module.k_norm):
                if norm is not None:
                    nn.init.ones_(norm.weight)
        # Modules come here one by one, those holding parameters only, first while the stock __init__ runs.
        elif module is getattr(getattr(self, "position_encoding", None), "conv", None):
            self.position_encoding.reset_parameters()

    @property
    def router_trained(self) -> bool:
        """Whether configuration "auto" may run: the model has a router, and it was trained (or is labelling)."""
        return self.router is not None and self.router.trained

    def configure_router(self, mode: str | None = None, threshold: float | None = None,
                         guarantee: dict | None = None) -> None:
        """Set the router's mode and τ (kept in the config, so a saved model routes the same way). A new τ drops
        the old one's guarantee; `guarantee` is the new τ's, when it was certified (`visor.policy.guarantee`)."""
        if self.router is None:
            raise ValueError("this model has a single configuration and no router")
        if mode is not None:
            if mode not in ROUTER_MODES:
                raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {mode!r}")
            if mode != self.config.router_mode:
                self.config.router_mode, self.config.router_guarantee = mode, None
        if threshold is not None:
            self.config.router_threshold = check_threshold(threshold)
            self.config.router_guarantee = guarantee
        elif guarantee is not None:
            raise ValueError("a guarantee belongs to a threshold: pass the τ it certifies")

    # ---- inputs -> streams ----------------------------------------------------------------------------------
    def embed_multimodal(self, input_ids: torch.LongTensor, image_features: list[torch.Tensor] | None = None,
                         video_features: list[torch.Tensor] | None = None,
                         **image_inputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Token embeddings with image and video features (after the CPE) in the `<image>` and `<video>` slots, the
        visual mask, and the DeepStack additions (see `embed_with_images`)."""
        return embed_with_images(self, input_ids, image_features, self.position_encoding, video_features,
                                 **image_inputs)

    # ---- the layer loop -------------------------------------------------------------------------------------
    def configuration_table(self, device=None) -> torch.Tensor:
        """(C, L) bool: which layers each configuration runs as SA."""
        table = torch.zeros(len(self.config.configurations), self.config.num_layers, dtype=torch.bool)
        for index, layers in enumerate(self.config.configurations):
            table[index, layers] = True
        return table.to(device)

    def _cross_block(self, index: int) -> CrossAttentionBlock | None:
        return self.cross_attention[str(index)] if str(index) in self.cross_attention else None

    def _run_layers(self, streams: _Streams) -> None:
        """Every decoder layer on `streams` (a prompt, or new tokens against the cache) with VISOR's kinds."""
        for index, layer in enumerate(self.text_stack.layers):
            streams.before_layer(index)
            block = self._cross_block(index)
            if block is not None:
                inputs = (streams.text, *streams.cross_keys_values(index, block), streams.cross_allowed,
                          streams.text_rope)
                # The stock layers checkpoint themselves (transformers' activation checkpointing); CA blocks here.
                streams.text = (checkpoint(block, *inputs, use_reentrant=False)
                                if self.training and self.is_activation_checkpointing else block(*inputs))
            outputs = []
            for runs_sa in (True, False):
                rows = (streams.sa_layers[:, index] == runs_sa).nonzero().squeeze(1)
                if len(rows):
                    outputs.append((rows, runs_sa, run_layer(layer, *streams.layer_inputs(index, rows, runs_sa))))
            for rows, runs_sa, output in outputs:
                streams.store(rows, runs_sa, output)
            streams.after_layer(index)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        configuration: int | list[int] | torch.Tensor | str | None = None,
        image_features: list[torch.Tensor] | None = None,
        router_threshold: float | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        video_features: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> VisorOutput:
        """Logits (and the loss on `labels`) with each sample's configuration of SA layers.

        `configuration`: an index into `config.configurations` for the whole batch, or one per sample; default
        the largest; `"auto"` lets the router choose per sample (threshold τ = `router_threshold`, default
        `config.router_threshold`). The output's `configuration` says which ran. `image_features`: precomputed
        projected features per image, instead of the images; `video_features` likewise per video, instead of
        `pixel_values_videos` (the videos' other arguments, which positions read, still come). The image inputs (`pixel_values` and those the
        family's `Backbone.image_inputs` names; every family's are in this signature, because `generate` checks
        keyword arguments against it), the video inputs (`Backbone.video_inputs`: video tokens are visual tokens
        like any image's) and the other arguments are those of the stock model.
        """
        if inputs_embeds is not None:
            raise ValueError(NEEDS_INPUT_IDS)
        hidden, configuration, cache = self.hidden_states(
            input_ids, pixel_values, attention_mask, position_ids, past_key_values, use_cache, configuration,
            image_features, router_threshold, video_features, image_sizes=image_sizes, batch_num_images=batch_num_images,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(self.text_stack.norm(hidden[:, keep]))  # the norm is per token: only the kept ones
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return VisorOutput(loss=loss, logits=logits, past_key_values=cache, configuration=configuration)

    def hidden_states(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        configuration: int | list[int] | torch.Tensor | str | None = None,
        image_features: list[torch.Tensor] | None = None,
        router_threshold: float | None = None,
        video_features: list[torch.Tensor] | None = None,
        **image_arguments,
    ) -> tuple[torch.Tensor, torch.Tensor, VisorCache | None]:
        """`forward` up to the final norm: the last layer's hidden states (a prompt: (B, S, d) in the original
        order; new tokens after a prefilled cache: (B, n, d)), the configuration each sample ran, and the cache.
        Serving engines that apply the head themselves call this (`visor.integrations.vllm`)."""
        if input_ids is None:
            raise ValueError(NEEDS_INPUT_IDS)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got {tuple(input_ids.shape)}")
        if attention_mask is not None and past_key_values is None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        attention = self.config.text_config._attn_implementation
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(f"VISOR runs with attention {SUPPORTED_ATTENTION}, not {attention!r}")
        image_inputs = self.backbone.select_image_inputs(pixel_values=pixel_values, **image_arguments)
        cache = resolve_cache(past_key_values, use_cache, VisorCache, "VISOR")
        prefilled = cache is not None and cache.is_prefilled
        self._check_length(input_ids.shape[1] + (cache.get_seq_length() if prefilled else 0))
        for name, value in (("pixel_values", pixel_values), ("image_features", image_features),
                            ("pixel_values_videos", image_inputs.get("pixel_values_videos")),
                            ("video_features", video_features)):
            parts = [value] if isinstance(value, torch.Tensor) else value or []
            if not prefilled and not all(bool(part.isfinite().all()) for part in parts):
                raise ValueError(f"{name} hold NaN or infinite values")
        position_ids = self.backbone.positions(self, input_ids, attention_mask, cache, position_ids, **image_inputs)
        if prefilled:
            hidden = self._decode(input_ids, attention_mask, position_ids, cache)
            configuration = cache.configuration
        else:
            choice = ConfigurationChoice.resolve(self.config, configuration, input_ids.shape[0], input_ids.device,
                                                 router_threshold, router_trained=self.router_trained)
            hidden, visual_mask, additions = self.embed_multimodal(input_ids, image_features, video_features,
                                                                   **image_inputs)
            layout = TokenLayout.build(visual_mask, attention_mask)
            streams = _Prefill(self, hidden, layout, position_ids, choice, cache, additions)
            self._run_layers(streams)
            hidden, configuration = layout.merge(streams.visual, streams.text), streams.configuration
            if cache is not None:
                cache.configuration = configuration
        return hidden, configuration, cache

    def generate(self, *args, configuration=None, **kwargs):
        """`GenerationMixin.generate` with `configuration=`; per-sample lists are checked, then become a tensor so
        that beam search and `num_return_sequences` expand them with the batch."""
        if isinstance(configuration, (list, tuple)):
            configuration = per_sample_indices(self.config, configuration)
        if configuration is not None and not isinstance(configuration, (int, str)):
            configuration = torch.as_tensor(configuration)
        return super().generate(*args, configuration=configuration, **kwargs)

    def _check_length(self, length: int) -> None:
        """Refuse a sequence beyond the text model's context length (its positions were never trained there)."""
        limit = self.config.text_config.max_position_embeddings
        if length > limit:
            raise ValueError(f"the sequence has {length} tokens, beyond the text model's context length of {limit}")

    def _decode(self, input_ids, attention_mask, position_ids, cache: VisorCache) -> torch.Tensor:
        """Hidden states of new text tokens appended to a prefilled cache."""
        _check_ids(input_ids, self.config.text_config.vocab_size)
        if bool(self.backbone.visual_token_mask(input_ids).any()):
            raise ValueError(NEW_TOKENS_ARE_TEXT)
        if input_ids.shape[0] != cache.sa_layers.shape[0]:
            raise ValueError(f"batch of {input_ids.shape[0]} does not match the cache's {cache.sa_layers.shape[0]}")
        count = input_ids.shape[1]
        new_valid = (
            attention_mask[:, -count:].bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        )
        streams = _Decode(self, self.get_input_embeddings()(input_ids), position_ids, new_valid, cache)
        self._run_layers(streams)
        return streams.text


# ---- what one layer sees: a whole prompt, or new tokens against the cache ------------------------------------------
class _Streams:
    """The text stream (and, at prefill, the visual one) with the masks, rotary embeddings and cache views each
    layer call needs: `text`, `text_rope`, `cross_allowed` (B, Nt, Nv: what each text token may read in a CA
    block) and `sa_layers` (B, L: which layers each sample runs as SA); `layer_inputs` gives the (hidden, bias,
    rope, cache view) of one layer call for some rows, as SA or as a text layer, and `store` takes its output."""

    def before_layer(self, index: int) -> None:
        pass

    def after_layer(self, index: int) -> None:
        pass

    def store(self, rows: torch.Tensor, runs_sa: bool, output: torch.Tensor) -> None:
        self.text = _put(self.text, rows, output)


class _Prefill(_Streams):
    def __init__(self, model: VisorModel, hidden: torch.Tensor, layout: TokenLayout, position_ids: torch.Tensor,
                 choice: ConfigurationChoice, cache: VisorCache | None, additions: list[torch.Tensor]):
        self.model, self.layout, self.cache, self.choice = model, layout, cache, choice
        self.visual, self.text = layout.split(hidden)
        # DeepStack: the stock model adds these to the visual positions after layers 0, 1, …; VISOR adds them to
        # the visual stream whether or not the layer ran as SA, so later SA layers and CA blocks read them.
        self.visual_additions = [layout.split(addition)[0] for addition in additions]
        self.full_rope = model.text_stack.rotary_emb(hidden, position_ids)
        self.visual_rope, self.text_rope = split_rope(layout, self.full_rope)
        # Without padding, SDPA's own causal kernel needs no (S, S) mask: the same fast path the stock model takes.
        causal_only = model.config.text_config._attn_implementation == "sdpa"
        self.full_bias = None if causal_only and bool(layout.token_valid.all()) else attention_bias(
            layout.full_mask(), hidden.dtype)
        self.text_bias = None if causal_only and bool(layout.text.valid.all()) else attention_bias(
            layout.text_mask(), hidden.dtype)
        self.cross_allowed = layout.cross_mask()
        self.table = model.configuration_table(hidden.device)
        self.configuration = (torch.zeros(len(hidden), dtype=torch.long, device=hidden.device)
                              if choice.routed else choice.indices)
        self.sa_layers = self.table[self.configuration]
        self.visual_unit = None  # the RMS-normalised visual tokens every CA block reads, until an SA layer changes them
        if cache is not None:
            cache.start(layout, self.sa_layers)

    def before_layer(self, index: int) -> None:
        """The router decides at its layer (layers before it run the same way in every configuration)."""
        if self.choice.routed and index == self.model.config.router_layer:
            router = self.model.router
            features = router.features(self.text, self.visual, self.layout.text.valid, self.layout.visual.valid)
            _, self.configuration = router.route(features, self.choice.threshold)
            self.sa_layers = self.table[self.configuration]
            if self.cache is not None:
                self.cache.sa_layers = self.sa_layers

    def after_layer(self, index: int) -> None:
        if index < len(self.visual_additions):
            self.visual = self.visual + self.visual_additions[index]
            self.visual_unit = None

    def cross_keys_values(self, index, block):
        if self.visual_unit is None:
            self.visual_unit = rms_unit(self.visual, block.visual_norm.variance_epsilon)
        keys, values = block.visual_keys_values(self.visual, self.visual_rope, self.visual_unit)
        if self.cache is not None:
            self.cache.store_cross(index, keys, values)
        return keys, values

    def layer_inputs(self, index, rows, runs_sa):
        cache = self.cache
        if not runs_sa:
            view = None if cache is None else LayerCacheView(cache, index, rows, prefill=True)
            return _take(self.text, rows), _take(self.text_bias, rows), _take(self.text_rope, rows), view
        layout = self.layout.select(rows) if len(rows) < len(self.text) else self.layout
        view = None if cache is None else LayerCacheView(cache, index, rows, prefill=True, sa_layout=layout)
        merged = layout.merge(_take(self.visual, rows), _take(self.text, rows))
        return merged, _take(self.full_bias, rows), _take(self.full_rope, rows), view

    def store(self, rows, runs_sa, output):
        if runs_sa:
            layout = self.layout.select(rows) if len(rows) < len(self.text) else self.layout
            visual, output = layout.split(output)
            self.visual = _put(self.visual, rows, visual)
            self.visual_unit = None
        super().store(rows, runs_sa, output)


class _Decode(_Streams):
    def __init__(self, model: VisorModel, text: torch.Tensor, position_ids: torch.Tensor, new_valid: torch.Tensor,
                 cache: VisorCache):
        cache.extend(new_valid)
        self.cache, self.text, self.sa_layers = cache, text, cache.sa_layers
        self.text_rope = model.text_stack.rotary_emb(text, position_ids)
        count, total = text.shape[1], cache.text_valid.shape[1]
        order = torch.arange(total, device=text.device)
        query_at = total - count + torch.arange(count, device=text.device)
        # New tokens see valid earlier text, each other causally, and always themselves.
        text_allowed = (cache.text_valid[:, None, :] & (order[None, None, :] <= query_at[None, :, None])) | (
            order[None, None, :] == query_at[None, :, None]
        )
        self.cross_allowed = cache.visual_valid[:, None, :].expand(-1, count, -1)
        self.text_bias = attention_bias(text_allowed, text.dtype)
        self.sa_bias = attention_bias(torch.cat([self.cross_allowed, text_allowed], dim=-1), text.dtype)

    def cross_keys_values(self, index, block):
        return self.cache.cross_keys[index], self.cache.cross_values[index]

    def layer_inputs(self, index, rows, runs_sa):
        bias = self.sa_bias if runs_sa else self.text_bias
        view = LayerCacheView(self.cache, index, rows, prefill=False, runs_sa=runs_sa)
        return _take(self.text, rows), _take(bias, rows), _take(self.text_rope, rows), view


def _take(value, rows: torch.Tensor):
    """value[rows] for a tensor or a tuple of tensors; the value itself when rows cover the whole batch."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_take(part, rows) for part in value)
    return value if len(rows) == value.shape[0] else value[rows]


def _put(value: torch.Tensor, rows: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return update if len(rows) == value.shape[0] else value.index_copy(0, rows, update.to(value.dtype))


def embed_with_images(model, input_ids: torch.Tensor, image_features: list[torch.Tensor] | None = None,
                      position_encoding: nn.Module | None = None, video_features: list[torch.Tensor] | None = None,
                      **image_inputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Token embeddings of `model` with the images' features in the `<image>` slots and the videos' in the
    `<video>` slots (each after `position_encoding`, if any), the visual mask (both kinds of slot), and DeepStack's
    additions: (B, S, d) per early layer, zero but at the image and video slots.

    `image_inputs` are the family's (`pixel_values`, `Backbone.image_inputs` and `Backbone.video_inputs`);
    `image_features` replaces the vision tower for the images (e.g. to reuse features across configurations or to
    time the language model alone): one projected (n_i, d) tensor per image, or (1 + K, n_i, d) for a family with
    DeepStack (the features, then what the stock model adds to the image's tokens after each of the first K layers),
    as `Backbone.encode_images` returns. `video_features` replaces it for the videos: one (n_v, d) or (1 + K, n_v, d)
    tensor per video, as `Backbone.encode_videos` returns."""
    _check_ids(input_ids, model.config.text_config.vocab_size)
    backbone = model.backbone
    video_inputs = {name: image_inputs.pop(name, None) for name in backbone.video_inputs}
    visual_mask = backbone.visual_token_mask(input_ids)
    embeds = model.get_input_embeddings()(input_ids)
    image_mask = input_ids == model.config.image_token_id
    additions = None
    if image_mask.any():
        if image_features is None:
            image_features = backbone.encode_images(model, int(image_mask.sum()), **image_inputs)
        embeds, additions = _fill_visual_slots(embeds, image_mask, image_features, position_encoding, "image",
                                               additions)
    video_mask = visual_mask & ~image_mask
    if video_mask.any():
        if video_features is None:
            video_features = backbone.encode_videos(model, int(video_mask.sum()), **video_inputs)
        embeds, additions = _fill_visual_slots(embeds, video_mask, video_features, position_encoding, "video",
                                               additions)
    else:
        for name, value in (("pixel_values_videos", video_inputs.get("pixel_values_videos")),
                            ("video_features", video_features)):
            if value is not None:
                raise ValueError(f"{name} given, but input_ids hold no video tokens")
    return embeds, visual_mask, additions or []


def _fill_visual_slots(embeds: torch.Tensor, slots: torch.Tensor, features, position_encoding: nn.Module | None,
                       kind: str, additions: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`embeds` with each image's (or video's) features in its `slots`, and DeepStack's additions (per early layer)
    with theirs added at those slots to `additions` (the images', or None before any): the stock model adds an
    image's and a video's alike, so both must bring as many layers."""
    features = list(features)
    if features and (len({item.dim() for item in features}) > 1 or features[0].dim() not in (2, 3)):
        raise ValueError(f"{kind} features must all be (n, d) or all (1 + K, n, d), got "
                         f"{[tuple(item.shape) for item in features]}")
    layers = []
    if features and features[0].dim() == 3:
        layers = [torch.cat([item[layer] for item in features]) for layer in range(1, features[0].shape[0])]
        features = [item[0] for item in features]
    embeds = _fill_slots(embeds, slots, features, position_encoding, kind)
    if additions is not None and len(layers) != len(additions):
        raise ValueError(f"the {kind} features hold {len(layers)} DeepStack layers, the images' {len(additions)}")
    scattered = [torch.zeros_like(embeds).masked_scatter(slots[..., None], layer.to(embeds.dtype)) for layer in layers]
    if additions is None:
        return embeds, scattered
    return embeds, [addition + layer for addition, layer in zip(additions, scattered)]


def _fill_slots(embeds: torch.Tensor, slots: torch.Tensor, features: list[torch.Tensor],
                position_encoding: nn.Module | None, kind: str) -> torch.Tensor:
    """`embeds` with the (n_i, d) `features` of each image (or video), after `position_encoding`, in its `slots`
    (B, S) in prompt order; each sample's slots must end where one of its images ends."""
    if position_encoding is not None:
        features = [position_encoding(item) for item in features]
    ends = torch.tensor([0] + [item.shape[0] for item in features]).cumsum(0)
    tokens_per_sample = slots.sum(dim=1)
    sample_ends = tokens_per_sample.cpu().cumsum(0)
    if ends[-1] != sample_ends[-1] or not torch.isin(sample_ends, ends).all():
        raise ValueError(
            f"{kind}-token count does not match the {kind}s: input_ids hold {tokens_per_sample.tolist()} <{kind}> "
            f"tokens per sample, the {kind}s give {[item.shape[0] for item in features]} features each"
        )
    return embeds.masked_scatter(slots[..., None], torch.cat(features).to(embeds.dtype))


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got [{int(input_ids.min())}, {int(input_ids.max())}]")


# ---- loading ------------------------------------------------------------------------------------------------------
LOCAL_SAFE_LOADING = dict(use_safetensors=True, local_files_only=True, trust_remote_code=False)


def load_stock(model_class, path: str | os.PathLike, **kwargs):
    """A stock checkpoint of `model_class` from a local folder (safetensors only; no hub access, no remote code)."""
    return load_strictly(model_class.from_pretrained, model_class.__name__, model_class.config_class.model_type, path,
                         **kwargs)


def load_strictly(load, kind: str, model_type: str, path: str | os.PathLike, may_lack: tuple[str, ...] = (),
                  **kwargs):
    """`load(path)` (a `from_pretrained`) of a local folder of a `kind` model (`model_type`), refusing any tensor the
    model lacks or the folder lacks (transformers would start a missing one at random and only warn), but for the
    modules named in `may_lack` (those a conversion creates)."""
    check_model_type(path, model_type)
    if kwargs.pop("output_loading_info", False):
        raise ValueError("loading is strict: there is no loading info to return")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would precede our error with the same facts
    try:
        with clear_load_errors(kind, path):
            # Mis-shaped tensors are reported in `info` (and refused below) instead of transformers' bare error.
            model, info = load(path, **{**LOCAL_SAFE_LOADING, **kwargs}, output_loading_info=True,
                               ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    info["missing_keys"] = [key for key in info.get("missing_keys", ())
                            if not key.startswith(tuple(f"{name}." for name in may_lack))]
    problems = [f"{what}: {_names(info.get(key))}" for key, what in (
        ("missing_keys", "missing from the folder"), ("unexpected_keys", "not in the model"),
        ("mismatched_keys", "of another shape")) if info.get(key)]
    if problems:
        raise ValueError(f"checkpoint {path}'s weights do not fit its config.json; tensors " + "; ".join(problems))
    return model


def share_checkpoint_layout(visor_class: type) -> None:
    """Let transformers map a stock folder's tensor names for `visor_class` as it does for its stock class (the
    Qwen-VL classes read an older layout by their class name), so `from_stock(folder)` reads what the stock reads."""
    stock_class = next(base for base in visor_class.__mro__ if base is not visor_class
                       and issubclass(base, PreTrainedModel) and not issubclass(base, VisorModel))
    mapping = get_checkpoint_conversion_mapping(stock_class.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(visor_class.__name__, mapping, overwrite=True)


def check_model_type(path: str | os.PathLike, model_type: str) -> None:
    """Refuse a checkpoint folder (see `check_checkpoint_folder`) whose config is not of `model_type`."""
    found = check_checkpoint_folder(path).get("model_type")
    if found != model_type:
        advice = " (VisorModel.from_stock converts a stock model)" if model_type.startswith("visor") else ""
        raise ValueError(f"checkpoint {path} holds a {found!r} model, not {model_type!r}{advice}")


def _names(keys, shown: int = 5) -> str:
    keys = sorted(key if isinstance(key, str) else key[0] for key in keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def check_checkpoint_folder(path: str | os.PathLike) -> dict:
    """The config.json of a local checkpoint folder with safetensors weights. Anything else is refused up front:
    transformers would look a bare name up on the hub, or fall back to a default 7B-sized config."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a local checkpoint folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint {path} has no config.json: not a saved checkpoint")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint {path} has a corrupt config.json: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint {path} has a config.json that is not a JSON object")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"checkpoint {path} has no safetensors weights")
    return config


@contextmanager
def clear_load_errors(kind: str, path: str | os.PathLike):
    """Every way a checkpoint folder can be broken (truncated weights, bad config …) as one ValueError."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"cannot load a {kind} checkpoint from {path}: {error}") from error
