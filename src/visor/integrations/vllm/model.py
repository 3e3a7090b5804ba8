"""A vLLM model for VISOR checkpoints: vLLM schedules, pages and serves; VISOR's own model computes.

Why an encoder-decoder model. vLLM caches, in every layer, the keys and values of every token of a request's
decoder stream. VISOR's text layers must hold no visual keys at all, so the visual tokens cannot be decoder
tokens. They are the *encoder* input instead (vision tower, projector; the CPE runs inside the model), and vLLM
gives every layer that declares a cross-attention cache (`CrossAttention`) room for exactly that request's
visual tokens. So the memory VISOR saves is what vLLM allocates:

    every layer        text keys/values           `Attention` cache over the decoder (text) tokens
    CA layers          the CA block's visual keys/values       a cross-attention cache
    SA layers          the stock layer's visual keys/values    a cross-attention cache (the served configuration's)
    other layers       nothing visual

Why VISOR's model computes the attention. An SA layer's text tokens attend to its visual *and* its text keys in
one softmax; vLLM's kernels attend to one cache at a time and return no log-sum-exp to merge two. So this class
uses vLLM's attention layers only to declare caches, and runs `VisorModel` itself: a prompt goes through
`VisorModel.hidden_states` exactly as in `generate()` (the image's tokens put back where the prompt had them),
and its caches are filed into vLLM's blocks (`paged`); a decoding step reads its requests' blocks back into a
`VisorCache`, runs VISOR's decoding loop and files the new token's keys. Greedy outputs therefore equal
`VisorForConditionalGeneration.generate`'s, which the tests check.

Positions. The decoder stream lacks the image, yet text after it keeps the original positions (with the gap
where the visual tokens sat). vLLM's M-RoPE hook (`get_mrope_input_positions`) carries them: three equal rows
of original positions, and the image's length as the offset for decoding. A prompt's tokens whose position
equals their index come before the image; that is how a prefill finds where to put the image back.

The configuration (`additional_config={"visor_configuration": ...}`): an index N, which every request runs and
whose SA layers get visual caches; or "auto", where the router picks per request at prefill (as in `generate`),
every SA candidate gets a visual cache (vLLM allocates a request's blocks before its prompt runs), and each
request's choice is kept by its first text block until it finishes. Only the LLaVA-OneVision family is served;
one image per prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY

from visor.backbones import family
from visor.integrations.vllm import CONFIGURATION_KEY, check_servable, paged
from visor.integrations.vllm.processing import VisorDummyInputsBuilder, VisorMultiModalProcessor, VisorProcessingInfo
from visor.modeling.cache import VisorCache


def served_configuration(vllm_config: VllmConfig) -> int | str:
    """The configuration this server runs (`additional_config`: an index or "auto"), checked against the
    checkpoint."""
    config = vllm_config.model_config.hf_config
    return check_servable(config.to_dict(), (vllm_config.additional_config or {}).get(CONFIGURATION_KEY))


@MULTIMODAL_REGISTRY.register_processor(VisorMultiModalProcessor, info=VisorProcessingInfo,
                                        dummy_inputs=VisorDummyInputsBuilder)
class VisorForVllm(nn.Module, SupportsMultiModal, SupportsMRoPE):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"VISOR takes images, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.configuration = served_configuration(vllm_config)
        config = vllm_config.model_config.hf_config
        self.checkpoint, self.dtype = vllm_config.model_config.model, vllm_config.model_config.dtype
        self.device = vllm_config.device_config.device
        with torch.device("meta"):  # the structure only: `load_weights` reads the checkpoint
            self.visor = family(config).VISOR_MODEL(config)
        routed = self.configuration == "auto"
        # Every SA candidate keeps a visual cache when the router chooses: vLLM allocates a request's blocks in
        # every cache group before the prompt runs, so the choice cannot shrink what the request holds.
        self.sa_layers = sorted({layer for layers in config.configurations for layer in layers} if routed
                                else config.configurations[self.configuration])
        self.routed: dict[int, int] = {}  # "auto": the configuration each live request ran, by its first text block
        text, cache_config = config.text_config, vllm_config.cache_config
        head_dim = self.visor.text_stack.layers[0].self_attn.head_dim
        scale = head_dim ** -0.5

        heads, key_value_heads = text.num_attention_heads, text.num_key_value_heads
        self.text_caches = nn.ModuleDict({
            str(layer): Attention(heads, head_dim, scale, num_kv_heads=key_value_heads, cache_config=cache_config,
                                  prefix=f"{prefix}.text_caches.{layer}")
            for layer in range(config.num_layers)})
        self.cross_caches = nn.ModuleDict({
            layer: CrossAttention(block.num_heads, head_dim, scale, num_kv_heads=block.num_key_value_heads,
                                  cache_config=cache_config, prefix=f"{prefix}.cross_caches.{layer}")
            for layer, block in self.visor.cross_attention.items()})
        self.visual_caches = nn.ModuleDict({
            str(layer): CrossAttention(heads, head_dim, scale, num_kv_heads=key_value_heads,
                                       cache_config=cache_config, prefix=f"{prefix}.visual_caches.{layer}")
            for layer in self.sa_layers})
        if not self.cross_caches and not self.visual_caches:
            raise ValueError("this configuration reads the image in no layer (no CA block, no SA layer)")

    # ---- weights ----------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint, read by VISOR's strict loader rather than from vLLM's `weights`: transformers maps its
        tensor names (saved checkpoints use older layouts) and refuses a tensor missing or unknown."""
        visor_class = type(self.visor)
        self.visor = visor_class.from_pretrained(self.checkpoint, dtype=self.dtype,
                                                 attn_implementation="sdpa").to(self.device).eval()
        return {name for name, _ in self.named_parameters()}

    # ---- inputs -------------------------------------------------------------------------------------------------
    def embed_multimodal(self, pixel_values=None, image_sizes=None, image_embeds=None, **_) -> list[torch.Tensor]:
        """The encoder: each image's projected features (n, d), before the CPE (the model applies it), from its
        pixels or as given (`image_embeds`: precomputed features)."""
        if image_embeds is not None:
            return [features.to(self.visor.dtype) for features in image_embeds]
        if pixel_values is None:
            return []
        images = []
        for pixels, size in zip(pixel_values, image_sizes):
            with torch.no_grad():
                images += self.visor.backbone.encode_images(self.visor, 0, pixel_values=pixels[None],
                                                            image_sizes=size.reshape(1, 2))
        return images

    def embed_input_ids(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.visor.get_input_embeddings()(input_ids)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Original-sequence positions of the text tokens (three equal rows: LLaVA-OV's positions are 1-D), and
        the images' length, which decoding adds to a new token's index."""
        positions = torch.arange(len(input_tokens))
        shift = 0
        for feature in sorted(mm_features, key=lambda feature: int(feature.data["image_offset"].data)):
            positions[int(feature.data["image_offset"].data):] += feature.mm_position.length
            shift += feature.mm_position.length
        return positions.expand(3, -1).clone(), shift

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_outputs=None, **_) -> torch.Tensor:
        hidden = torch.zeros(len(input_ids), self.visor.config.text_config.hidden_size,
                             dtype=self.visor.dtype, device=input_ids.device)
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or metadata.get(self.text_caches["0"].layer_name) is None:
            return hidden  # vLLM's warm-up and profiling runs: no requests, no caches
        text_meta = metadata[self.text_caches["0"].layer_name]
        starts = text_meta.query_start_loc.cpu()
        lengths = starts[1:] - starts[:-1]
        cached = text_meta.seq_lens.cpu() - lengths
        visual = self._visual_lengths(metadata, len(lengths))
        prefill = (cached == 0).nonzero().squeeze(1)
        decode = (cached > 0).nonzero().squeeze(1)
        with torch.no_grad():
            if len(prefill):
                self._prefill(prefill, starts, lengths, visual, input_ids, positions, encoder_outputs or [],
                              metadata, hidden)
            if len(decode):
                if bool((lengths[decode] != 1).any()):
                    raise ValueError("VISOR decodes one token per request and step (no speculative decoding)")
                self._decode(decode, starts, cached, visual, input_ids, positions, metadata, hidden)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.visor.lm_head(hidden_states)

    # ---- the two kinds of step ----------------------------------------------------------------------------------
    def _first_blocks(self, metadata: dict, rows: torch.Tensor) -> list[int]:
        """Each request's first block of the first text cache: its own while it lives (it prefills again if vLLM
        preempts it), so it keys what the router chose for it."""
        return metadata[self.text_caches["0"].layer_name].block_table[rows, 0].tolist()

    def _visual_lengths(self, metadata: dict, requests: int) -> torch.Tensor:
        """Visual tokens per request (its encoder length), from any cross-attention layer's metadata."""
        layer = next(iter({**self.cross_caches, **self.visual_caches}.values()))
        return metadata[layer.layer_name].seq_lens.cpu()[:requests].long()

    def _prefill(self, rows, starts, lengths, visual, input_ids, positions, encoder_outputs, metadata, hidden):
        """Whole prompts through VISOR (as `generate` runs them), their caches filed into vLLM's blocks."""
        image_token = self.visor.config.image_token_id
        with_image = [int(row) for row in rows if visual[row] > 0]
        if len(encoder_outputs) != len(with_image) or any(
                output.shape[-2] != visual[row] for output, row in zip(encoder_outputs, with_image)):
            raise ValueError("vLLM handed over image features that do not match the prompts being prefilled: "
                             f"{[tuple(output.shape) for output in encoder_outputs]} for {visual[rows].tolist()} "
                             "visual tokens")
        prompts = []
        for row in rows.tolist():
            ids = input_ids[starts[row]:starts[row + 1]]
            original = positions[0, starts[row]:starts[row + 1]].cpu()
            before = int((original == torch.arange(len(ids))).sum())  # text tokens before the image
            image = torch.full((int(visual[row]),), image_token, dtype=ids.dtype, device=ids.device)
            prompts.append(torch.cat([ids[:before], image, ids[before:]]))
        longest = max(len(prompt) for prompt in prompts)
        batch = torch.stack([nn.functional.pad(prompt, (longest - len(prompt), 0)) for prompt in prompts])
        mask = torch.stack([nn.functional.pad(torch.ones_like(prompt), (longest - len(prompt), 0))
                            for prompt in prompts])
        # Original-sequence positions of the left-padded prompts, as `generate` passes them (LLaVA-OV's are 1-D).
        out, configuration, cache = self.visor.hidden_states(batch, attention_mask=mask, use_cache=True,
                                                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                                             image_features=list(encoder_outputs) or None,
                                                             configuration=self.configuration)
        if self.configuration == "auto":
            first_blocks = self._first_blocks(metadata, rows)
            self.routed.update(zip(first_blocks, configuration.tolist()))
        text = mask.bool() & (batch != image_token)
        for index, row in enumerate(rows.tolist()):
            hidden[starts[row]:starts[row + 1]] = self.visor.text_stack.norm(out[index][text[index]])
        self._file_prefill(cache, rows, starts, visual, metadata)

    def _file_prefill(self, cache: VisorCache, rows, starts, visual, metadata) -> None:
        # Layers of one kind may sit in several of vLLM's cache groups: each layer's own slots and block table.
        for layer, keeper in self.text_caches.items():
            keys, values, valid = (cache.text_keys[int(layer)], cache.text_values[int(layer)], cache.text_valid)
            slots = metadata[keeper.layer_name].slot_mapping
            for index, row in enumerate(rows.tolist()):
                paged.write(keeper.kv_cache, slots[starts[row]:starts[row + 1]],
                            keys[index][:, valid[index]].transpose(0, 1), values[index][:, valid[index]].transpose(0, 1))
        with_image = [index for index, row in enumerate(rows.tolist()) if visual[row] > 0]
        every_row = list(range(len(rows)))
        for layer, keeper in {**self.cross_caches, **self.visual_caches}.items():
            if layer in self.cross_caches:
                keys, values, ran = cache.cross_keys[int(layer)], cache.cross_values[int(layer)], every_row
            elif int(layer) in cache.visual_keys:  # an SA layer's keys are held for the rows that ran it
                keys, values = cache.visual_keys[int(layer)], cache.visual_values[int(layer)]
                ran = cache.visual_rows[int(layer)].tolist()
            else:
                continue  # no request of this step ran the SA layer
            slots = metadata[keeper.layer_name].slot_mapping
            start = 0
            for index in with_image:  # every request has blocks here; those that ran the layer fill them
                seen = cache.visual_valid[index]
                count = int(seen.sum())
                if index in ran:
                    where = ran.index(index)
                    paged.write(keeper.kv_cache, slots[start:start + count], keys[where][:, seen].transpose(0, 1),
                                values[where][:, seen].transpose(0, 1))
                start += count

    def _decode(self, rows, starts, cached, visual, input_ids, positions, metadata, hidden):
        """One new token per request: its blocks read back into a `VisorCache`, VISOR's decoding loop, the new
        keys filed."""
        cache = VisorCache()
        for layer, keeper in self.text_caches.items():
            keys, values, valid = paged.read(keeper.kv_cache, metadata[keeper.layer_name].block_table[rows],
                                             cached[rows])
            cache.text_keys[int(layer)], cache.text_values[int(layer)] = keys, values
        cache.text_valid = valid
        cache.configuration = (torch.tensor([self.routed[block] for block in self._first_blocks(metadata, rows)])
                               if self.configuration == "auto" else
                               torch.full((len(rows),), self.configuration, dtype=torch.long))
        cache.sa_layers = self.visor.configuration_table()[cache.configuration]
        longest = int(visual[rows].max())
        cache.visual_valid = torch.arange(longest)[None, :] < visual[rows][:, None]
        for layer, keeper in self.cross_caches.items():
            cache.cross_keys[int(layer)], cache.cross_values[int(layer)], _ = paged.read(
                keeper.kv_cache, metadata[keeper.layer_name].block_table[rows], visual[rows], longest)
        for layer, keeper in self.visual_caches.items():  # the rows whose configuration ran the SA layer
            ran = cache.sa_layers[:, int(layer)].nonzero().squeeze(1)
            cache.visual_keys[int(layer)], cache.visual_values[int(layer)], _ = paged.read(
                keeper.kv_cache, metadata[keeper.layer_name].block_table[rows[ran]], visual[rows[ran]], longest)
            cache.visual_rows[int(layer)] = ran
        cache.seen_tokens = int((cached[rows] + visual[rows]).max())
        tokens = starts[rows]
        out, _, cache = self.visor.hidden_states(input_ids[tokens][:, None], past_key_values=cache, use_cache=True,
                                                 position_ids=positions[0, tokens][:, None])
        hidden[tokens] = self.visor.text_stack.norm(out[:, 0])
        for layer, keeper in self.text_caches.items():
            paged.write(keeper.kv_cache, metadata[keeper.layer_name].slot_mapping[tokens],
                        cache.text_keys[int(layer)][:, :, -1], cache.text_values[int(layer)][:, :, -1])
