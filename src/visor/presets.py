"""Named model shapes, built from configs alone (no download).

`tiny` is the demo's from-scratch LLaVA-OneVision model; `tiny-llama` is the same with a Llama text model;
`tiny-qwen2-vl`, `tiny-qwen2.5-vl` and `tiny-qwen3-vl` are the Qwen-VL families at the same text size (patch 8, so a
16-pixel merged patch per visual token); `tiny-internvl3` is InternVL3 at that size (64-pixel tiles of 16 tokens);
`llava-ov-0.5b`, `qwen2.5-vl-3b`, `qwen3-vl-2b` and `internvl3-1b` have the real models' shapes for FLOP counting and
benchmarks with random weights.
"""

from __future__ import annotations

from transformers import (
    InternVLConfig,
    LlamaConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SiglipVisionConfig,
)

# Token ids shared by every tiny preset; the in-project tokenizer reserves them (see visor.data).
TINY_VOCAB_SIZE = 512
TINY_IMAGE_TOKEN_ID = 3
TINY_VIDEO_TOKEN_ID = 4
TINY_PAD_TOKEN_ID = 0
# The Qwen-VL presets' markers around an image's tokens, at the top of the vocabulary (the tiny tokenizer's words
# stay far below).
TINY_VISION_START_TOKEN_ID = TINY_VOCAB_SIZE - 2
TINY_VISION_END_TOKEN_ID = TINY_VOCAB_SIZE - 1

# A crop is 64x64 px in 8x8 patches (64 visual tokens); anyres grids up to 2x2 crops.
TINY_CROP = 64
TINY_PATCH = 8
TINY_GRID_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]


def _tiny_vision_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CROP,
        patch_size=TINY_PATCH,
        vision_use_head=False,
    )


def _tiny_text_kwargs(num_layers: int) -> dict:
    return dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,  # as the 0.5B text model: room for a bench's 7,290 visual tokens
        tie_word_embeddings=True,
        pad_token_id=TINY_PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )


def _tiny_llava_config(text_config) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=_tiny_vision_config(),
        text_config=text_config,
        image_token_index=TINY_IMAGE_TOKEN_ID,
        video_token_index=TINY_VIDEO_TOKEN_ID,
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def tiny(num_layers: int = 6) -> LlavaOnevisionConfig:
    """Tiny LLaVA-OV with a Qwen2 text model (GQA 4 heads / 2 KV heads, d=128)."""
    return _tiny_llava_config(Qwen2Config(**_tiny_text_kwargs(num_layers)))


def tiny_llama(num_layers: int = 6) -> LlavaOnevisionConfig:
    """Tiny LLaVA-OV with a Llama text model (as SmolLM2 or Llama checkpoints use)."""
    return _tiny_llava_config(LlamaConfig(**_tiny_text_kwargs(num_layers)))


def _tiny_qwen_vl_ids() -> dict:
    return dict(image_token_id=TINY_IMAGE_TOKEN_ID, video_token_id=TINY_VIDEO_TOKEN_ID,
                vision_start_token_id=TINY_VISION_START_TOKEN_ID, vision_end_token_id=TINY_VISION_END_TOKEN_ID,
                tie_word_embeddings=True)


def _tiny_qwen_vl_text(num_layers: int) -> dict:
    """The tiny text model with M-RoPE: head_dim 32, its 16 frequencies split 4/6/6 over time, height, width."""
    return dict(_tiny_text_kwargs(num_layers), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})


def tiny_qwen2_vl(num_layers: int = 6) -> Qwen2VLConfig:
    """Tiny Qwen2-VL: a 2-layer ViT (width 64, patch 8, 2×2 merger) and the tiny Qwen2 text model with M-RoPE."""
    vision = dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=2, patch_size=TINY_PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, hidden_size=128)
    return Qwen2VLConfig(vision_config=vision, text_config=_tiny_qwen_vl_text(num_layers), **_tiny_qwen_vl_ids())


def tiny_qwen2_5_vl(num_layers: int = 6) -> Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL: a 2-layer ViT with windowed attention (32-pixel windows; block 1 attends fully), SwiGLU
    MLPs and a 2×2 merger, and the tiny Qwen2 text model with M-RoPE."""
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=TINY_PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1],
                  out_hidden_size=128)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=_tiny_qwen_vl_text(num_layers), **_tiny_qwen_vl_ids())


def tiny_qwen3_vl(num_layers: int = 6) -> Qwen3VLConfig:
    """Tiny Qwen3-VL: a 2-layer ViT (patch 8, learned positions on an 8×8 grid, 2×2 merger) whose both layers feed
    DeepStack (added after LLM layers 0 and 1), and a tiny Qwen3 text model (q/k norms) with interleaved M-RoPE."""
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=TINY_PATCH,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    text = dict(_tiny_qwen_vl_text(num_layers), head_dim=32)
    return Qwen3VLConfig(vision_config=vision, text_config=text, **_tiny_qwen_vl_ids())


def tiny_internvl3(num_layers: int = 6) -> InternVLConfig:
    """Tiny InternVL3: a 2-layer InternViT (width 64, 64-pixel tiles of 8x8 patches, pixel shuffle to 4x4 = 16
    tokens per tile) and the tiny Qwen2 text model."""
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  attention_bias=True, image_size=TINY_CROP, patch_size=TINY_PATCH)
    return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_tiny_text_kwargs(num_layers)),
                          image_token_id=TINY_IMAGE_TOKEN_ID, image_seq_length=16, downsample_ratio=0.5,
                          vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=True)


def llava_ov_0_5b() -> LlavaOnevisionConfig:
    """LLaVA-OneVision-0.5B shapes: SigLIP-400M as LLaVA-OV uses it (26 layers, d=1152, 384 px, patch 14) + Qwen2-0.5B (24 layers)."""
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=151646,
        video_token_index=151647,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


# The Qwen-VL checkpoints' token ids (their tokenizer's <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>).
_QWEN_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)


def qwen2_5_vl_3b() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B shapes: a 32-block ViT (d=1280, patch 14, 112-pixel windows, full attention in blocks 7, 15,
    23, 31) + a 36-layer Qwen2.5 text model (d=2048, 16 heads, 2 K/V heads)."""
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=2048)
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **_QWEN_VL_IDS)


def qwen3_vl_2b() -> Qwen3VLConfig:
    """Qwen3-VL-2B shapes: a 24-block ViT (d=1024, patch 16, DeepStack from blocks 5, 11, 17) + a 28-layer Qwen3
    text model (d=2048, 16 heads of 128, 8 K/V heads, q/k norms, interleaved M-RoPE)."""
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                  deepstack_visual_indexes=[5, 11, 17])
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True},
                tie_word_embeddings=True)
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **_QWEN_VL_IDS)


def internvl3_1b() -> InternVLConfig:
    """InternVL3-1B shapes. Vision: InternViT-300M-448px (24 layers, d=1024, 16 heads, MLP 4096, 448-pixel tiles of
    14-pixel patches, q/k/v biases), which are `InternVLVisionConfig`'s defaults (its docstring names
    OpenGVLab/InternVL3-1B-hf), biases from the released checkpoint's attention; pixel shuffle 0.5 (256 tokens per
    tile), GELU projector and image token 151667: `InternVLConfig`'s defaults. Text: Qwen2.5-0.5B (24 layers, d=896,
    14 heads, 2 K/V heads, MLP 4864, rope theta 1e6, 32k context, tied embeddings), with the vocabulary of
    InternVL3's tokenizer (151,674: Qwen2.5's and InternVL's added tokens), from the released config."""
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  attention_bias=True, image_size=448, patch_size=14)
    text = Qwen2Config(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667, image_seq_length=256,
                          downsample_ratio=0.5, vision_feature_select_strategy="default", vision_feature_layer=-1,
                          tie_word_embeddings=True)


PRESETS = {"tiny": tiny, "tiny-llama": tiny_llama, "tiny-qwen2-vl": tiny_qwen2_vl, "tiny-qwen2.5-vl": tiny_qwen2_5_vl,
           "tiny-qwen3-vl": tiny_qwen3_vl, "tiny-internvl3": tiny_internvl3, "llava-ov-0.5b": llava_ov_0_5b,
           "qwen2.5-vl-3b": qwen2_5_vl_3b, "qwen3-vl-2b": qwen3_vl_2b, "internvl3-1b": internvl3_1b}


def preset_config(name: str):
    """The stock config of a named preset; a clear error names the ones that exist."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
