"""A vLLM model for VISOR checkpoints: VISOR's layer kinds on vLLM's own decoder layers, caches and kernels.

Why an encoder-decoder model. vLLM caches, in every layer, the keys and values of every token of a request's
decoder stream. VISOR's text layers must hold no visual keys at all, so the visual tokens cannot be decoder
tokens. They are the *encoder* input instead (vision tower and projector, VISOR's own modules), and vLLM gives
every layer that declares a cross-attention cache (`CrossAttention`) room for exactly that request's visual
tokens. So the memory VISOR saves is what vLLM allocates:

    every layer        text keys/values                          the decoder layer's own `Attention` cache
    CA layers          the CA block's visual keys/values         a cross-attention cache (`cross_caches`)
    SA layers          the stock layer's visual keys/values      a cross-attention cache (`visual_caches`)
    other layers       nothing visual

How each kind runs. The text model is vLLM's own implementation of the family's text model (Qwen2, Llama or
Qwen3 layers, loaded by vLLM's weight loader, so its linear layers, quantisation and tensor parallelism are
vLLM's). Every layer is the stock vLLM decoder layer:

- a **text** layer runs over the step's text tokens with vLLM's attention kernel over its text cache;
- a **CA block** (VISOR's module, in front of its layer) reads the visual keys with vLLM's cross-attention kernel
  when decoding; while prefilling, where a text token may read only the images before it, its rows are computed
  in torch with that mask (the kernel files the visual keys either way);
- an **SA** layer runs over the text tokens and, for prompts being prefilled, their visual tokens, in the
  original order. Its attention is one softmax over the layer's visual and text keys; vLLM's CPU kernel attends
  to one cache per call and returns no log-sum-exp, so the layer's `attn` is `JointAttention`, which stores the
  layer's tokens in the original order across its visual and text blocks and runs the kernel once over both
  (`visor.integrations.vllm.paged`).

Positions. The decoder stream lacks the image, yet text after it keeps the original positions. vLLM's M-RoPE hook
(`get_mrope_input_positions`) carries them, computed by the family's own position code over the prompt with its
image tokens put back (`Backbone.prompt_positions`); LLaVA-OV's 1-D positions ride as three equal rows.

The configuration (`additional_config={"visor_configuration": ...}`): an index N, which every request runs and
whose SA layers get visual caches; or "auto", where the router picks per request at prefill (as in `generate`),
every SA candidate gets a visual cache (vLLM allocates a request's blocks before its prompt runs), and each
request's choice is kept by its first text block until it finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3Model
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from visor.backbones import family
from visor.integrations.vllm import CONFIGURATION_KEY, check_servable, paged
from visor.integrations.vllm.processing import VisorDummyInputsBuilder, VisorMultiModalProcessor, VisorProcessingInfo
from visor.integrations.vllm.step import ImageSlot, Step, tag

# vLLM's implementation of each text model VISOR's families use (keyed by the text config's model type).
TEXT_MODELS = {"qwen2": Qwen2Model, "llama": LlamaModel, "qwen2_vl_text": Qwen2Model,
               "qwen2_5_vl_text": Qwen2Model, "qwen3_vl_text": Qwen3Model}
# Text models whose M-RoPE interleaves its axes (transformers' Qwen3-VL does so always and keeps no flag; vLLM's
# rotary embedding reads it from the rope parameters).
INTERLEAVED_ROPE = ("qwen3_vl_text",)
TEXT_WEIGHTS = "model.language_model."  # where a VISOR checkpoint keeps the text model's tensors


def served_configuration(vllm_config: VllmConfig) -> int | str:
    """The configuration this server runs (`additional_config`: an index or "auto"), checked against the
    checkpoint."""
    config = vllm_config.model_config.hf_config
    return check_servable(config, (vllm_config.additional_config or {}).get(CONFIGURATION_KEY))


def visor_modules(config) -> tuple[nn.Module, Callable[[str], str]]:
    """VISOR's model of the family without its text model (vLLM's runs the text): the vision tower, projector,
    CPE, CA blocks and router, their parameters on the meta device until `load_weights` fills them; and the
    renaming of a checkpoint's tensor names to the full model's, as transformers loads it (checkpoints keep the
    layout their family was released in)."""
    from accelerate import init_empty_weights
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    with init_empty_weights(include_buffers=False):  # buffers (positions, rotary frequencies) are computed here
        model = family(config).VISOR_MODEL(config)
    transforms = get_model_conversion_mapping(model)
    renamings = [transform for transform in transforms if not isinstance(transform, WeightConverter)]
    converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
    names = model.state_dict()

    def rename(name: str) -> str:
        renamed, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, names)
        if converted is not None:
            raise ValueError(f"checkpoint tensor {name} needs a conversion ({converted}) this plugin does not make")
        return renamed

    text = model.text_stack
    text.layers, text.embed_tokens, text.norm = nn.ModuleList(), None, None
    model.lm_head = None
    return model.eval(), rename


class _StepContext:
    """What the layers of one forward call share (a plain object, so the layers it reaches are not submodules)."""

    step: Step | None = None
    sa_rows: torch.Tensor | None = None  # (R,) whether each request runs the current layer as SA
    prefill_orders: dict[int, torch.Tensor] | None = None  # request -> its SA layer tokens in the original order


class JointAttention(nn.Module):
    """The `attn` of an SA layer (see the module docstring): files the layer's new keys and attends with vLLM's
    kernel over the layer's joint sequence, visual and text keys in one softmax (`paged.JointCache`). It takes the
    place of the layer's `Attention`, whose cache it uses (vLLM allocated it by that layer's name); rows that run
    the layer as a text layer read their text keys alone."""

    def __init__(self, text_cache, visual_cache, context: _StepContext):
        super().__init__()
        self._caches = (text_cache, visual_cache)  # a tuple: they stay registered where vLLM put them
        self.context = context
        self.num_heads, self.num_kv_heads = text_cache.num_heads, text_cache.num_kv_heads
        self.head_size, self.scale = text_cache.head_size, text_cache.impl.scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        text_cache, visual_cache = self._caches
        context, step = self.context, self.context.step
        metadata = get_forward_context().attn_metadata
        # Layers of one kind may sit in several of vLLM's cache groups: each layer's own block tables.
        text_metadata, visual_metadata = metadata[text_cache.layer_name], metadata[visual_cache.layer_name]
        cache = paged.JointCache.of(visual_cache.kv_cache, text_cache.kv_cache)
        requests = step.requests
        joint = context.sa_rows & (step.visual > 0)
        text_tokens = step.cached + step.lengths
        table = cache.block_table(visual_metadata.block_table[:requests], step.visual,
                                  text_metadata.block_table[:requests], text_tokens, joint)
        lengths = text_tokens + step.visual * joint
        rows, positions, query_start = self._rows(step, joint, lengths)
        table_rows = torch.repeat_interleave(torch.arange(requests), query_start.diff())
        query = query.view(len(query), self.num_heads, self.head_size)
        key = key.view(len(key), self.num_kv_heads, self.head_size)
        value = value.view(len(value), self.num_kv_heads, self.head_size)
        isa = text_cache.isa
        cache.write(key[rows], value[rows], table, table_rows, positions, isa)
        output = torch.empty_like(query)
        output[rows] = cache.attend(query[rows].contiguous(), query_start, lengths, table, self.scale, isa)
        return output.view(len(output), -1)

    def _rows(self, step: Step, joint: torch.Tensor, lengths: torch.Tensor):
        """The kernel's rows, request after request, each in its sequence's order: which flat tokens they are,
        their positions in the sequence, and where each request's rows start."""
        if not len(step.prefill):  # decoding only: one token per request, the last of its sequence
            return step.starts[:-1], lengths - 1, torch.arange(step.requests + 1)
        rows, positions, counts = [], [], []
        for request in range(step.requests):
            if step.cached[request] > 0:
                order = step.starts[request:request + 1]
                where = lengths[request:request + 1] - 1
            else:
                order = self.context.prefill_orders.get(request) if bool(joint[request]) else None
                if order is None:
                    order = torch.arange(int(step.starts[request]), int(step.starts[request + 1]))
                where = torch.arange(len(order))
            rows.append(order)
            positions.append(where)
            counts.append(len(order))
        query_start = torch.tensor([0, *counts]).cumsum(0)
        return torch.cat(rows), torch.cat(positions), query_start


@MULTIMODAL_REGISTRY.register_processor(VisorMultiModalProcessor, info=VisorProcessingInfo,
                                        dummy_inputs=VisorDummyInputsBuilder)
class VisorForVllm(nn.Module, SupportsMultiModal, SupportsMRoPE):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError(f"VISOR takes images and videos, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.configuration = served_configuration(vllm_config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise ValueError("VISOR's own modules (vision tower, CA blocks, router) are not sharded: serve it on one "
                             f"rank (tensor_parallel_size={parallel.tensor_parallel_size}, "
                             f"pipeline_parallel_size={parallel.pipeline_parallel_size} given)")
        config = vllm_config.model_config.hf_config
        self.config, self.dtype = config, vllm_config.model_config.dtype
        text = config.text_config
        if text.model_type not in TEXT_MODELS:
            raise ValueError(f"vLLM serves VISOR on the text models {sorted(TEXT_MODELS)}, not {text.model_type!r}")
        if text.model_type in INTERLEAVED_ROPE:
            text.rope_parameters = {**text.rope_parameters, "mrope_interleaved": True}
        self.visor, self._rename = visor_modules(config)
        self.backbone = self.visor.backbone
        self.language_model = TEXT_MODELS[text.model_type](vllm_config=vllm_config,
                                                           prefix=maybe_prefix(prefix, "language_model"))
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if getattr(config, "tie_word_embeddings", False) or text.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)

        routed = self.configuration == "auto"
        # Every SA candidate keeps a visual cache when the router chooses: vLLM allocates a request's blocks in
        # every cache group before the prompt runs, so the choice cannot shrink what the request holds.
        self.sa_layers = sorted({layer for layers in config.configurations for layer in layers} if routed
                                else config.configurations[self.configuration])
        self.routed: dict[int, int] = {}  # "auto": the configuration each live request ran, by its first text block
        self.table = self.visor.configuration_table()  # (C, L) which layers each configuration runs as SA
        layers = self.language_model.layers
        attention = layers[0].self_attn
        self.multi_axis = isinstance(attention.rotary_emb, MRotaryEmbedding)
        head_dim, scale = attention.head_dim, attention.head_dim ** -0.5
        cache_config = vllm_config.cache_config
        self.cross_caches = nn.ModuleDict({
            layer: CrossAttention(block.num_heads, head_dim, scale, num_kv_heads=block.num_key_value_heads,
                                  cache_config=cache_config, prefix=f"{prefix}.cross_caches.{layer}")
            for layer, block in self.visor.cross_attention.items()})
        self.visual_caches = nn.ModuleDict({
            str(layer): CrossAttention(attention.total_num_heads, head_dim, scale,
                                       num_kv_heads=attention.total_num_kv_heads, cache_config=cache_config,
                                       prefix=f"{prefix}.visual_caches.{layer}")
            for layer in self.sa_layers})
        if not self.cross_caches and not self.visual_caches:
            raise ValueError("this configuration reads the image in no layer (no CA block, no SA layer)")
        self.context = _StepContext()
        for layer in self.sa_layers:
            host = layers[layer].self_attn
            host.attn = JointAttention(host.attn, self.visual_caches[str(layer)], self.context)

    # ---- weights ----------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The text model's tensors through vLLM's loader (its stacked q/k/v and gate/up shards, quantisation,
        tensor parallelism); VISOR's own modules and the vision side from the same checkpoint, every tensor
        accounted for (a missing or unknown one is an error naming it)."""
        own: dict[str, torch.Tensor] = {}
        head = []

        def text_weights():
            for name, tensor in weights:
                name = self._rename(name)
                if name.startswith(TEXT_WEIGHTS):
                    yield name[len(TEXT_WEIGHTS):], tensor
                elif name == "lm_head.weight":
                    head.append(tensor)
                else:
                    own[name] = tensor

        loaded = {f"language_model.{name}" for name in self.language_model.load_weights(text_weights())}
        expected = set(self.visor.state_dict())
        missing, unexpected = sorted(expected - set(own)), sorted(set(own) - expected)
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit its VISOR config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.visor.load_state_dict(own, strict=True, assign=True)
        for parameter in self.visor.parameters():
            parameter.data = parameter.data.to(self.dtype)
        loaded |= {f"visor.{name}" for name, _ in self.visor.named_parameters()}
        if head:
            getattr(self.lm_head.weight, "weight_loader", default_weight_loader)(self.lm_head.weight, head[0])
        loaded |= {name for name, _ in self.named_parameters() if name.startswith("lm_head.")}
        return loaded

    # ---- inputs -------------------------------------------------------------------------------------------------
    def embed_multimodal(self, image_offset=None, images_in_prompt=None, image_embeds=None, pixel_values=None,
                         image_sizes=None, image_grid_thw=None, video_offset=None, pixel_values_videos=None,
                         **_) -> list[torch.Tensor]:
        """The encoder: each image's projected features (n, d) before the CPE (the model applies it), from its
        pixels or as given (`image_embeds`: precomputed features), tagged with where it sits (`step.tag`); each
        LLaVA-OV video's likewise (its frames' pooled tokens and the newline: visual tokens like an image's).
        DeepStack's (1 + K, n, d) travels as (n, (1 + K) d): vLLM takes 2-D encoder outputs only."""
        if video_offset is not None:  # vLLM encodes one modality per call
            return [tag(self.backbone.encode_videos(self.visor, 0, pixel_values_videos=pixels[None])[0],
                        ImageSlot(int(offset), {})) for pixels, offset in zip(pixel_values_videos, video_offset)]
        if image_offset is None:
            return []
        if image_embeds is not None:
            if image_grid_thw is not None and isinstance(image_embeds, torch.Tensor):  # flat, as the grids say
                merge = self.config.vision_config.spatial_merge_size
                image_embeds = image_embeds.split((image_grid_thw.prod(-1) // merge**2).tolist())
            features = [image.to(self.dtype) for image in image_embeds]
        elif image_grid_thw is not None:  # Qwen-VL: every image's patches in one flat tensor
            pixels = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
            features = self.backbone.encode_images(self.visor, 0, pixel_values=pixels, image_grid_thw=image_grid_thw)
        else:  # LLaVA-OV: one image at a time (its crops); a prompt's several images are read one crop each
            features = []
            for pixels, size, count in zip(pixel_values, image_sizes, images_in_prompt):
                features += self.backbone.encode_images(self.visor, 0, pixel_values=pixels[None],
                                                        image_sizes=size.reshape(1, 2),
                                                        batch_num_images=count.reshape(1))
        grids = image_grid_thw if image_grid_thw is not None else [None] * len(features)
        return [tag(image.transpose(0, 1).flatten(1) if image.dim() == 3 else image,
                    ImageSlot(int(offset), {} if grid is None else {"image_grid_thw": grid}))
                for image, offset, grid in zip(features, image_offset, grids)]

    def embed_input_ids(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """The text tokens' positions in the original prompt (3 rows), and the offset decoding adds to a new
        token's index."""
        slots = [ImageSlot(int(feature.data[f"{feature.modality}_offset"].data),
                           {} if "image_grid_thw" not in feature.data
                           else {"image_grid_thw": feature.data["image_grid_thw"].data}) for feature in mm_features]
        lengths = [feature.mm_position.length for feature in mm_features]
        positions, text = self._prompt_positions(torch.tensor(input_tokens), slots, lengths)
        text_positions = positions[:, text]
        return text_positions, int(text_positions.max()) + 1 - len(input_tokens) if len(input_tokens) else 0

    def _prompt_positions(self, text_ids: torch.Tensor, slots: list[ImageSlot], lengths: list[int]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (3, S) of a prompt whose text is `text_ids` and whose images (their slots and token counts)
        sit where the slots say, as the family computes them; and which of the S tokens are text."""
        pieces, is_text, start = [], [], 0
        image_token = self.config.image_token_id
        for slot, length in sorted(zip(slots, lengths), key=lambda item: item[0].offset):
            pieces += [text_ids[start:slot.offset], torch.full((length,), image_token, dtype=text_ids.dtype)]
            is_text += [torch.ones(slot.offset - start, dtype=torch.bool), torch.zeros(length, dtype=torch.bool)]
            start = slot.offset
        pieces.append(text_ids[start:])
        is_text.append(torch.ones(len(text_ids) - start, dtype=torch.bool))
        ids = torch.cat(pieces)[None]
        inputs = {}
        for name in self.backbone.image_inputs:
            values = [slot.inputs[name] for slot in sorted(slots, key=lambda slot: slot.offset) if name in slot.inputs]
            if values:
                inputs[name] = torch.stack(values)
        positions = self.backbone.prompt_positions(self.visor, ids, None, **inputs).reshape(-1, ids.shape[1])
        return positions.expand(3, -1).long(), torch.cat(is_text)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_outputs=None, **_) -> torch.Tensor:
        layers = self.language_model.layers
        metadata = get_forward_context().attn_metadata
        first = layers[0].self_attn.attn
        name = first._caches[0].layer_name if isinstance(first, JointAttention) else first.layer_name
        if not isinstance(metadata, dict) or metadata.get(name) is None:
            # vLLM's warm-up and profiling runs: no requests, no caches
            return torch.zeros(len(input_ids), self.config.text_config.hidden_size, dtype=self.dtype,
                               device=input_ids.device)
        visual_metadata = metadata[next(iter({**self.cross_caches, **self.visual_caches}.values())).layer_name]
        step = Step.read(metadata[name], visual_metadata.seq_lens.cpu())
        step.check()
        with torch.no_grad():
            return self._run(step, input_ids, positions, list(encoder_outputs or []), metadata)

    def _run(self, step: Step, input_ids, positions, encoder_outputs, metadata) -> torch.Tensor:
        hidden = self.language_model.embed_input_ids(input_ids)
        text_positions = positions if self.multi_axis else positions[0]
        prompts = self._prompts(step, input_ids, encoder_outputs)
        configuration = self._configurations(step)
        context = self.context
        context.step = step
        for index, layer in enumerate(self.language_model.layers):
            if self.config.router_layer == index and self.configuration == "auto":
                configuration = self._route(step, hidden, prompts, configuration, metadata)
            block = self.visor.cross_attention[str(index)] if str(index) in self.visor.cross_attention else None
            if block is not None:
                hidden = self._cross_attention(index, block, step, hidden, text_positions, prompts)
            if index in self.sa_layers:
                hidden = self._self_attention(index, layer, step, hidden, text_positions, prompts, configuration)
            else:
                out, residual = layer(text_positions, hidden, None)
                hidden = out + residual
            for prompt in prompts.values():  # DeepStack: added to the visual stream, SA or not
                if index < len(prompt["additions"]):
                    prompt["visual"] = prompt["visual"] + prompt["additions"][index]
        context.step = None
        return self.language_model.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- the step's prompts --------------------------------------------------------------------------------------
    def _prompts(self, step: Step, input_ids, encoder_outputs) -> dict[int, dict]:
        """For each prompt being prefilled with images: its visual tokens (after the CPE; DeepStack's additions),
        their positions and the original order of its tokens."""
        with_image = [request for request in step.prefill.tolist() if step.visual[request] > 0]
        prompts, outputs = {}, iter(encoder_outputs)
        for request in with_image:
            images, count = [], 0
            while count < step.visual[request]:
                image = next(outputs, None)
                if image is None:
                    break
                images.append(image)
                count += image.shape[0]
            if count != step.visual[request]:
                raise ValueError("vLLM handed over image features that do not match the prompts being prefilled: "
                                 f"{[tuple(output.shape) for output in encoder_outputs]} for "
                                 f"{step.visual[step.prefill].tolist()} visual tokens")
            hidden = self.config.text_config.hidden_size
            stacked = [image.view(len(image), -1, hidden).transpose(0, 1) for image in images]  # (1 + K, n, d)
            features = [image[0] for image in stacked]
            if self.visor.position_encoding is not None:
                features = [self.visor.position_encoding(image) for image in features]
            additions = [torch.cat([image[k] for image in stacked]) for k in range(1, stacked[0].shape[0])]
            text = input_ids[step.tokens(request)].cpu()
            full, is_text = self._prompt_positions(text, [image.visor_slot for image in images],
                                                   [len(image) for image in images])
            prompts[request] = dict(visual=torch.cat(features).to(self.dtype), additions=additions,
                                    visual_positions=full[:, ~is_text].to(input_ids.device), is_text=is_text,
                                    sees=self._sees(is_text))
        return prompts

    @staticmethod
    def _sees(is_text: torch.Tensor) -> torch.Tensor:
        """(text, visual) bool: a text token reads the visual tokens before it in the prompt."""
        order = torch.arange(len(is_text))
        return order[is_text][:, None] > order[~is_text][None, :]

    def _configurations(self, step: Step) -> torch.Tensor:
        """(R,) the configuration each request runs (decoding ones: as chosen at their prefill)."""
        if self.configuration != "auto":
            return torch.full((step.requests,), self.configuration, dtype=torch.long)
        configuration = torch.zeros(step.requests, dtype=torch.long)  # layers before the router: any
        for request in step.decode.tolist():
            configuration[request] = self.routed[int(step.text_block_table[request, 0])]
        return configuration

    def _route(self, step: Step, hidden, prompts, configuration, metadata) -> torch.Tensor:
        """The router's choice for each prompt being prefilled, kept by its first text block."""
        router = self.visor.router
        for request in step.prefill.tolist():
            text = hidden[step.tokens(request)][None]
            visual = prompts[request]["visual"][None] if request in prompts else text.new_zeros(1, 0, text.shape[-1])
            features = router.features(text, visual, torch.ones(text.shape[:2], dtype=torch.bool),
                                       torch.ones(visual.shape[:2], dtype=torch.bool))
            _, chosen = router.route(features, self.config.router_threshold)
            configuration[request] = int(chosen[0])
            self.routed[int(step.text_block_table[request, 0])] = int(chosen[0])
        return configuration

    # ---- the layer kinds -------------------------------------------------------------------------------------
    def _rotate(self, index: int, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """RoPE of layer `index` on (N, heads, head_dim) states at `positions`."""
        flat = states.flatten(1)
        # M-RoPE takes a query and a key; the key is a scratch copy here (the rotary kernels work in place).
        rotated, _ = self.language_model.layers[index].self_attn.rotary_emb(positions, flat.clone(), flat.clone())
        return rotated.view(states.shape)

    def _cross_attention(self, index, block, step: Step, hidden, text_positions, prompts) -> torch.Tensor:
        """The CA block in front of layer `index`: the kernel over the cached visual keys for decoding rows; each
        prompt being prefilled in torch, its text reading only the images before each token (vLLM's kernel files
        the prompts' visual keys meanwhile)."""
        cache = self.cross_caches[str(index)]
        query = block.project_queries(hidden)
        if block.use_rope:
            query = self._rotate(index, text_positions, query)
        keys, values = [], []
        for prompt in prompts.values():
            key, value = block.project_visual(prompt["visual"])
            keys.append(self._rotate(index, self._visual_positions(prompt), key) if block.use_rope else key)
            values.append(value)
        sees = torch.zeros(len(hidden), dtype=torch.bool, device=hidden.device)
        sees[step.starts[step.decode]] = step.visual[step.decode] > 0
        attended = torch.zeros(len(hidden), block.num_heads * block.head_dim, dtype=hidden.dtype,
                               device=hidden.device)
        if bool(step.visual.any()):
            attended = cache(query.flatten(1), torch.cat(keys).flatten(1) if keys else None,
                             torch.cat(values).flatten(1) if values else None)
        for (request, prompt), key, value in zip(prompts.items(), keys, values):
            rows, allowed = step.tokens(request), prompt["sees"].to(hidden.device)
            read = nn.functional.scaled_dot_product_attention(
                query[rows].transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                attn_mask=(allowed | ~allowed.any(-1, keepdim=True))[None, None], scale=block.scaling,
                enable_gqa=True)
            attended[rows] = read[0].transpose(0, 1).flatten(1).to(attended.dtype)
            sees[rows] = allowed.any(-1)
        attended = torch.where(sees[:, None], attended, 0)
        return block.add(hidden, attended, sees)

    def _visual_positions(self, prompt: dict) -> torch.Tensor:
        return prompt["visual_positions"] if self.multi_axis else prompt["visual_positions"][0]

    def _self_attention(self, index, layer, step: Step, hidden, text_positions, prompts, configuration
                        ) -> torch.Tensor:
        """An SA layer: the stock layer over the text tokens and the visual tokens of the prompts being prefilled
        that run it as SA, in their original order (`JointAttention`), visual tokens updated."""
        context = self.context
        context.sa_rows = self.table[configuration, index]
        running = [request for request in prompts if bool(context.sa_rows[request])]
        tokens, token_positions = [hidden], [text_positions]
        context.prefill_orders = {}
        start = len(hidden)
        for request in running:
            prompt = prompts[request]
            count = len(prompt["visual"])
            tokens.append(prompt["visual"])
            token_positions.append(self._visual_positions(prompt))
            order = torch.empty(len(prompt["is_text"]), dtype=torch.long)
            order[prompt["is_text"]] = torch.arange(int(step.starts[request]), int(step.starts[request + 1]))
            order[~prompt["is_text"]] = torch.arange(start, start + count)
            context.prefill_orders[request] = order
            start += count
        out, residual = layer(torch.cat(token_positions, dim=-1), torch.cat(tokens), None)
        out = out + residual
        start = len(hidden)
        for request in running:
            count = len(prompts[request]["visual"])
            prompts[request]["visual"] = out[start:start + count]
            start += count
        return out[:len(hidden)]
