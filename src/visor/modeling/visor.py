"""`VisorForConditionalGeneration`: LLaVA-OneVision whose language model meets vision only where asked.

The class *is* a `LlavaOnevisionForConditionalGeneration` (same vision tower, projector, decoder layers and
state-dict names, so a stock checkpoint loads as is) with a few new modules, the CA blocks and the CPE, and
its own decoder-layer loop. Each layer of the text model runs as one of three kinds (DESIGN.md 2.2):

    SA    the stock layer over [V; T] in the original order, mask and positions   (visual tokens updated)
    CA    T ← T + CA(T, V), then the stock layer over T only                        (visual tokens unchanged)
    text  the stock layer over T only                                               (visual tokens unchanged)

Which layers are SA is chosen per sample (`configuration=`); at an SA layer the samples that run it go
through the full layer together and the rest through the text-only path, then both are scattered back.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from safetensors import SafetensorError
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from visor.config import VisorConfig
from visor.modeling.cache import LayerCacheView, VisorCache, resolve_cache
from visor.modeling.cross_attention import CrossAttentionBlock, rms_unit
from visor.modeling.layout import TokenLayout, attention_bias
from visor.modeling.position_encoding import ConditionalPositionEncoding
from visor.modeling.router import ConfigurationRouter

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass
class VisorOutput(CausalLMOutputWithPast):
    """The stock causal-LM output plus `configuration`: (B,) the configuration each sample ran."""

    configuration: torch.LongTensor | None = None


class VisorForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    config_class = VisorConfig
    _supports_flash_attn = False  # masks are explicit (B, 1, Q, K) tensors; flash kernels take none
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def __init__(self, config: VisorConfig):
        super().__init__(config)
        layers = self.model.language_model.layers
        text_config = config.text_config
        self.cross_attention = nn.ModuleDict(
            {
                str(layer): CrossAttentionBlock(
                    layers[layer],
                    text_config,
                    gate=config.cross_attention_gate,
                    mlp=config.cross_attention_mlp,
                    rope=config.cross_attention_rope,
                    key_value_heads=config.cross_attention_key_value_heads,
                )
                for layer in config.cross_attention_layers
            }
        )
        self.position_encoding = (
            ConditionalPositionEncoding(text_config.hidden_size, config.position_encoding_kernel)
            if config.position_encoding
            else None
        )
        self.router = (
            ConfigurationRouter.for_config(config)
            if len(config.configurations) > 1 and config.router_layer is not None
            else None
        )
        self.post_init()

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' `from_pretrained`; a local folder is checked first and broken ones raise ValueError."""
        if not os.path.isdir(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        check_checkpoint_folder(pretrained_model_name_or_path)
        with clear_load_errors("VISOR", pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **{**LOCAL_SAFE_LOADING, **kwargs})

    @classmethod
    def from_llava(
        cls,
        llava: LlavaOnevisionForConditionalGeneration | str | os.PathLike,
        visor_config: VisorConfig | None = None,
        **config_options,
    ) -> "VisorForConditionalGeneration":
        """Build VISOR around a stock LLaVA-OV model (or a local checkpoint folder), reusing all its weights.

        The new modules start as described in DESIGN.md 2.3/2.4: gated CA blocks and CPE are no-ops, or the
        CA blocks copy their host layer's attention when `cross_attention_init="host"`.
        """
        if not isinstance(llava, LlavaOnevisionForConditionalGeneration):
            llava = load_llava(llava)
        if visor_config is None:
            visor_config = VisorConfig.from_llava_config(llava.config, **config_options)
        elif config_options:
            raise ValueError("pass either visor_config or config options, not both")
        visor_config._attn_implementation = llava.config.text_config._attn_implementation
        model = cls(visor_config).to(dtype=llava.dtype, device=llava.device)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        new_modules = ("cross_attention.", "position_encoding.", "router.")
        missing = [key for key in missing if not key.startswith(new_modules)]
        if missing or unexpected:
            raise ValueError(f"LLaVA-OV weights do not fit this VISOR config: missing {missing}, unexpected {unexpected}")
        model.initialise_new_modules()
        return model.train(llava.training)

    @torch.no_grad()
    def initialise_new_modules(self) -> None:
        """Put the CA blocks and the CPE in their documented starting state."""
        layers = self.model.language_model.layers
        for layer, block in self.cross_attention.items():
            for gate in (block.attention_gate, block.mlp_gate):
                if gate is not None:
                    gate.zero_()
            if self.config.cross_attention_init == "host":
                block.copy_host(layers[int(layer)])
        if self.position_encoding is not None:
            self.position_encoding.reset_parameters()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CrossAttentionBlock):
            for gate in (module.attention_gate, module.mlp_gate):
                if gate is not None:
                    nn.init.zeros_(gate)
            nn.init.ones_(module.text_norm.weight)
            nn.init.ones_(module.visual_norm.weight)
        elif isinstance(module, ConditionalPositionEncoding):
            module.reset_parameters()

    # ---- inputs -> streams ----------------------------------------------------------------------------------
    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        batch_num_images: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image features (after the CPE) in the `<image>` slots, and the image mask.

        `image_features` (one (n_i, d) projected tensor per image) replaces the vision tower, e.g. to reuse
        features across configurations or to time the language model alone.
        """
        _check_ids(input_ids, self.config.text_config.vocab_size)
        visual_mask = input_ids == self.config.image_token_id
        embeds = self.get_input_embeddings()(input_ids)
        tokens_per_sample = visual_mask.sum(dim=1)
        if not visual_mask.any():
            return embeds, visual_mask
        features = (
            list(image_features)
            if image_features is not None
            else self.encode_images(pixel_values, image_sizes, batch_num_images, int(tokens_per_sample.sum()))
        )
        if self.position_encoding is not None:
            features = [self.position_encoding(image) for image in features]
        images_per_sample = (
            batch_num_images.tolist() if batch_num_images is not None else [1] * len(features)
        )
        if len(images_per_sample) != input_ids.shape[0] or sum(images_per_sample) != len(features):
            raise ValueError(
                f"{len(features)} images for a batch of {input_ids.shape[0]}: pass batch_num_images when a sample "
                "holds more or fewer than one image"
            )
        lengths = torch.tensor([image.shape[0] for image in features], device=input_ids.device)
        sample_of_image = torch.repeat_interleave(
            torch.arange(len(images_per_sample), device=input_ids.device),
            torch.tensor(images_per_sample, device=input_ids.device),
        )
        expected = torch.zeros_like(tokens_per_sample).index_add_(0, sample_of_image, lengths)
        if not torch.equal(expected, tokens_per_sample):
            raise ValueError(
                f"image-token count does not match the images: input_ids hold {tokens_per_sample.tolist()} "
                f"<image> tokens per sample, the images give {expected.tolist()} features"
            )
        features = torch.cat(features).to(embeds.dtype)
        return embeds.masked_scatter(visual_mask[..., None], features), visual_mask

    def encode_images(self, pixel_values, image_sizes, batch_num_images, num_image_tokens: int) -> list[torch.Tensor]:
        """The stock vision tower, projector and anyres packing: one (n_i, d) tensor per image."""
        if pixel_values is None or image_sizes is None:
            raise ValueError(
                f"input_ids contain {num_image_tokens} image tokens but pixel_values/image_sizes are missing"
            )
        if pixel_values.dim() not in (4, 5) or pixel_values.shape[-3] != 3:
            raise ValueError(
                f"pixel_values must be (batch, crops, 3, H, W) or (crops, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        if image_sizes.dim() != 2 or image_sizes.shape[-1] != 2:
            raise ValueError(f"image_sizes must be (num_images, 2) as (height, width), got {tuple(image_sizes.shape)}")
        return self.model.get_image_features(
            pixel_values, image_sizes, batch_num_images=batch_num_images, return_dict=True
        ).pooler_output

    # ---- the layer loop -------------------------------------------------------------------------------------
    def configuration_table(self, device=None) -> torch.Tensor:
        """(C, L) bool: which layers each configuration runs as SA."""
        table = torch.zeros(len(self.config.configurations), self.config.num_layers, dtype=torch.bool)
        for index, layers in enumerate(self.config.configurations):
            table[index, layers] = True
        return table.to(device)

    def route(self, text: torch.Tensor, visual: torch.Tensor, layout: TokenLayout, threshold: float | None = None):
        """The router's logits and decision (B,) from the streams as they are at the router layer."""
        return self.router.route(self.router.features(text, visual, layout.text_valid, layout.visual_valid), threshold)

    def _cross_block(self, index: int) -> CrossAttentionBlock | None:
        return self.cross_attention[str(index)] if str(index) in self.cross_attention else None

    def prefill_layers(
        self,
        hidden: torch.Tensor,
        layout: TokenLayout,
        position_ids: torch.Tensor,
        configuration: torch.Tensor | None,
        cache: VisorCache | None = None,
        threshold: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder stack over a whole prompt with VISOR's layer kinds.

        `configuration`: (B,) indices, or None to let the router choose when the stack reaches
        `config.router_layer` (layers before it run the same way in every configuration). Returns the final
        hidden states (B, S, d) and the configurations that ran.
        """
        rotary = self.model.language_model.rotary_emb
        visual, text = layout.split(hidden)
        visual_positions, text_positions = layout.split(position_ids[..., None])
        full_rope = rotary(hidden, position_ids)
        text_rope = rotary(text, text_positions[..., 0])
        visual_rope = rotary(visual, visual_positions[..., 0])
        # Without padding, SDPA's own causal kernel needs no (S, S) mask: the same fast path the stock model takes.
        causal_only = self.config.text_config._attn_implementation == "sdpa"
        full_bias = None if causal_only and bool(layout.token_valid.all()) else attention_bias(layout.full_mask(), hidden.dtype)
        text_bias = None if causal_only and bool(layout.text_valid.all()) else attention_bias(layout.text_mask(), hidden.dtype)
        cross_allowed = layout.cross_mask()
        table = self.configuration_table(hidden.device)
        routed = configuration is None
        if routed:
            configuration = torch.zeros(len(hidden), dtype=torch.long, device=hidden.device)
        sa_layers = table[configuration]
        if cache is not None:
            cache.start(layout, sa_layers)

        visual_unit = None  # the RMS-normalised visual tokens every CA block reads, until an SA layer changes them
        for index, layer in enumerate(self.model.language_model.layers):
            if routed and index == self.config.router_layer:
                _, configuration = self.route(text, visual, layout, threshold)
                sa_layers = table[configuration]
                if cache is not None:
                    cache.sa_layers = sa_layers
            block = self._cross_block(index)
            if block is not None:
                if visual_unit is None:
                    visual_unit = rms_unit(visual, block.visual_norm.variance_epsilon)
                keys, values = block.visual_keys_values(visual, visual_rope, visual_unit)
                if cache is not None:
                    cache.store_cross(index, keys, values)
                text = block(text, keys, values, cross_allowed, text_rope)
            sa_rows, text_rows = _split_rows(sa_layers[:, index])
            new_text = []
            if len(sa_rows):
                rows_layout = layout.select(sa_rows) if len(sa_rows) < len(text) else layout
                merged = _call_layer(
                    layer, rows_layout.merge(_take(visual, sa_rows), _take(text, sa_rows)),
                    _take(full_bias, sa_rows), _take(full_rope, sa_rows),
                    _prefill_view(cache, index, sa_rows, rows_layout),
                )
                sa_visual, sa_text = rows_layout.split(merged)
                visual = _put(visual, sa_rows, sa_visual)
                visual_unit = None
                new_text.append((sa_rows, sa_text))
            if len(text_rows):
                text_only = _call_layer(
                    layer, _take(text, text_rows), _take(text_bias, text_rows), _take(text_rope, text_rows),
                    _prefill_view(cache, index, text_rows, None),
                )
                new_text.append((text_rows, text_only))
            for rows, update in new_text:
                text = _put(text, rows, update)
        return layout.merge(visual, text), configuration

    def decode_layers(
        self, text: torch.Tensor, position_ids: torch.Tensor, new_valid: torch.Tensor, cache: VisorCache
    ) -> torch.Tensor:
        """Run new text tokens (B, n, d) through every layer against the cache (DESIGN.md 2.8)."""
        cache.extend(new_valid)
        text_rope = self.model.language_model.rotary_emb(text, position_ids)
        count = text.shape[1]
        total = cache.text_valid.shape[1]
        order = torch.arange(total, device=text.device)
        query_at = total - count + torch.arange(count, device=text.device)
        # New tokens see valid earlier text, each other causally, and always themselves.
        text_allowed = (cache.text_valid[:, None, :] & (order[None, None, :] <= query_at[None, :, None])) | (
            order[None, None, :] == query_at[None, :, None]
        )
        visual_allowed = cache.visual_valid[:, None, :].expand(-1, count, -1)
        text_bias = attention_bias(text_allowed, text.dtype)
        sa_bias = attention_bias(torch.cat([visual_allowed, text_allowed], dim=-1), text.dtype)

        for index, layer in enumerate(self.model.language_model.layers):
            block = self._cross_block(index)
            if block is not None:
                text = block(text, cache.cross_keys[index], cache.cross_values[index], visual_allowed, text_rope)
            updates = []
            for rows, runs_sa in zip(_split_rows(cache.sa_layers[:, index]), (True, False)):
                if len(rows):
                    bias = sa_bias if runs_sa else text_bias
                    output = _call_layer(
                        layer, _take(text, rows), _take(bias, rows), _take(text_rope, rows),
                        LayerCacheView(cache, index, rows, prefill=False, runs_sa=runs_sa),
                    )
                    updates.append((rows, output))
            for rows, output in updates:
                text = _put(text, rows, output)
        return text

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        configuration: int | list[int] | torch.Tensor | str | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
        router_threshold: float | None = None,
        **kwargs,
    ) -> "VisorOutput":
        """Logits (and the loss on `labels`) with each sample's configuration of SA layers.

        `configuration`: an index into `config.configurations` for the whole batch, or one per sample;
        default the largest; `"auto"` lets the router choose per sample (threshold τ = `router_threshold`, default
        `config.router_threshold`). The output's `configuration` says which ran. `image_features`: precomputed projected features per image, instead of
        `pixel_values`. Other arguments are those of `LlavaOnevisionForConditionalGeneration`.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("VISOR needs input_ids (it finds the visual tokens by the <image> token id)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got {tuple(input_ids.shape)}")
        if attention_mask is not None and past_key_values is None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        attention = self.config.text_config._attn_implementation
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(f"VISOR runs with attention {SUPPORTED_ATTENTION}, not {attention!r}")
        cache = resolve_cache(past_key_values, use_cache, VisorCache, "VISOR")
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(length, device=input_ids.device) + past).expand(batch, length)
        if cache is not None and cache.is_prefilled:
            hidden = self._decode(input_ids, attention_mask, position_ids, cache)
            configuration = cache.configuration
        else:
            hidden, visual_mask = self.embed_multimodal(
                input_ids, pixel_values, image_sizes, batch_num_images, image_features
            )
            layout = TokenLayout.build(visual_mask, attention_mask)
            hidden, configuration = self.prefill_layers(
                hidden, layout, position_ids, self._configuration_indices(configuration, batch, input_ids.device),
                cache, router_threshold,
            )
            if cache is not None:
                cache.configuration = configuration
        hidden = self.model.language_model.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return VisorOutput(loss=loss, logits=logits, past_key_values=cache, configuration=configuration)

    def _configuration_indices(self, configuration, batch: int, device) -> torch.Tensor | None:
        """(B,) configuration indices, or None for "auto" (the router decides)."""
        if isinstance(configuration, str):
            if configuration != "auto":
                raise ValueError(f'configuration must be an index, one index per sample, or "auto"; got {configuration!r}')
            if self.router is None:
                raise ValueError('configuration="auto" needs a router: this model has a single configuration')
            return None
        indices = self.config.resolve_configuration(configuration, batch)
        return torch.tensor(indices, dtype=torch.long, device=device)

    def generate(self, *args, configuration=None, **kwargs):
        """`GenerationMixin.generate` with `configuration=`; per-sample lists become a tensor so that beam
        search and `num_return_sequences` expand them with the batch."""
        if configuration is not None and not isinstance(configuration, (int, str)):
            configuration = torch.as_tensor(configuration)
        return super().generate(*args, configuration=configuration, **kwargs)

    def _decode(self, input_ids, attention_mask, position_ids, cache: VisorCache) -> torch.Tensor:
        """Hidden states of new text tokens appended to a prefilled cache."""
        _check_ids(input_ids, self.config.text_config.vocab_size)
        if bool((input_ids == self.config.image_token_id).any()):
            raise ValueError("new tokens after the prompt must be text: images go in the first (prefill) call")
        if input_ids.shape[0] != cache.sa_layers.shape[0]:
            raise ValueError(f"batch of {input_ids.shape[0]} does not match the cache's {cache.sa_layers.shape[0]}")
        count = input_ids.shape[1]
        new_valid = (
            attention_mask[:, -count:].bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        )
        return self.decode_layers(self.get_input_embeddings()(input_ids), position_ids, new_valid, cache)


def _split_rows(runs_sa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the samples that run a layer as SA, and of those that run it on text only."""
    return runs_sa.nonzero().squeeze(1), (~runs_sa).nonzero().squeeze(1)


def _take(value, rows: torch.Tensor):
    """value[rows] for a tensor or a tuple of tensors; the value itself when rows cover the whole batch."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_take(part, rows) for part in value)
    return value if len(rows) == value.shape[0] else value[rows]


def _put(value: torch.Tensor, rows: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return update if len(rows) == value.shape[0] else value.index_copy(0, rows, update.to(value.dtype))


def _call_layer(layer, hidden, bias, rope, cache_view):
    """One stock decoder layer with explicit mask and positions (and, when caching, a cache view)."""
    return layer(
        hidden,
        attention_mask=bias,
        position_embeddings=rope,
        past_key_values=cache_view,
        use_cache=cache_view is not None,
    )


def _prefill_view(cache, layer, rows, sa_layout):
    """The cache view of a prefill layer call (None when not caching); `sa_layout` only for SA rows."""
    return None if cache is None else LayerCacheView(cache, layer, rows, prefill=True, sa_layout=sa_layout)


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got [{int(input_ids.min())}, {int(input_ids.max())}]")


def load_llava(path: str | os.PathLike, **kwargs) -> LlavaOnevisionForConditionalGeneration:
    """Load a local LLaVA-OV checkpoint (safetensors only; no hub access, no remote code)."""
    check_checkpoint_folder(path)
    with clear_load_errors("LLaVA-OneVision", path):
        return LlavaOnevisionForConditionalGeneration.from_pretrained(path, **LOCAL_SAFE_LOADING, **kwargs)


LOCAL_SAFE_LOADING = dict(use_safetensors=True, local_files_only=True, trust_remote_code=False)


def check_checkpoint_folder(path: str | os.PathLike) -> None:
    """Refuse a folder without config.json up front: transformers would fall back to a default 7B-sized config."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a local checkpoint folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} has no config.json: not a saved checkpoint")


@contextmanager
def clear_load_errors(kind: str, path: str | os.PathLike):
    """Every way a checkpoint folder can be broken (truncated weights, bad config …) as one ValueError."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"cannot load a {kind} checkpoint from {path}: {error}") from error
