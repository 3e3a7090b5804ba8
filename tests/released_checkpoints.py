"""Tiny checkpoint folders laid out as each family's checkpoints are released, with random weights (no download).

Not the project's presets with their `<image>` word tokenizer: each folder holds what a user downloads for that
family, scaled down, so the code that reads real checkpoints is tested on the real layout:

    config.json, generation_config.json, model.safetensors   the stock model (the family's tiny preset)
    tokenizer.json, tokenizer_config.json                    a byte-level BPE tokenizer ("Qwen2Tokenizer") with the
                                                             family's special tokens (<|im_start|>, <|im_end|>, and
                                                             <image> / <video>, or <|vision_start|> <|image_pad|> …,
                                                             or InternVL's <img> <IMG_CONTEXT> </img>, named in
                                                             tokenizer_config.json's extra_special_tokens)
    chat_template.json                                       the family's multimodal chat template (typed parts)
    preprocessor_config.json (+ processor_config.json, video_preprocessor_config.json where the family ships one)
                                                             the image processor's settings, normalisation included

The chat templates render what the released ones render for images, text, system and assistant turns (written
here, not copied: no tools, no video options). Token ids, pixel bounds and crop sizes are the tiny models'.

    python tests/released_checkpoints.py OUTPUT_DIR   writes one folder per family under OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from visor import presets
from visor.data.tokenizer import suite_vocabulary

FAMILIES = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl3")

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# InternVL3's tokenizer: Qwen2.5's special tokens, then InternVL's; the image and video ones are named for its
# processor.
INTERNVL_MARKERS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                    "video_token": "<video>"}
INTERNVL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>",
                                                 "</ref>", "<box>", "</box>", "<video>"]

# llava-hf's LLaVA-OneVision template: a turn's images first (each "<image>\n"), then its text.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-VL's and Qwen2.5-VL's template: a default system turn, parts in their order, plain-text content allowed.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's (Instruct) template: no default system turn, content through one macro.
QWEN3_VL_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\n' }}{{ render(message.content) }}{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


# InternVL3's (-hf) template: parts in their order, each image as "<IMG_CONTEXT>\n" (the processor writes the
# tiles' tokens between <img> and </img>), plain-text content allowed.
INTERNVL3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(special_tokens: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Qwen2's kind) trained on the suite's words, with `special_tokens` after it."""
    words = suite_vocabulary() + ["You", "are", "a", "helpful", "assistant", ".", "system", "user"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([" ".join(words)] * 4, trainer)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    if backend.get_vocab_size() > presets.TINY_VOCAB_SIZE:
        raise RuntimeError(f"{backend.get_vocab_size()} tokens do not fit the tiny models' vocabulary")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   errors="replace", clean_up_tokenization_spaces=False)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def _model_config(family: str, tokenizer):
    eos, pad = _ids(tokenizer, "<|im_end|>", "<|endoftext|>")
    if family == "llava-onevision":
        config = presets.tiny()
        config.image_token_id, config.video_token_id = _ids(tokenizer, "<image>", "<video>")
    elif family == "internvl3":
        config = presets.tiny_internvl3()
        (config.image_token_id,) = _ids(tokenizer, "<IMG_CONTEXT>")
    else:
        config = presets.PRESETS[f"tiny-{family}"]()
        (config.image_token_id, config.video_token_id, config.vision_start_token_id,
         config.vision_end_token_id) = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                            "<|vision_end|>")
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = pad, eos, pad
    return config


def _processor_files(family: str, config) -> dict[str, dict]:
    """The processor settings files of the family's released checkpoints, for the tiny model's shapes."""
    vision = config.vision_config
    if family == "llava-onevision":
        crop = {"height": vision.image_size, "width": vision.image_size}
        return {
            "preprocessor_config.json": {
                "crop_size": crop, "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
                "do_resize": True, "image_grid_pinpoints": config.image_grid_pinpoints, "image_mean": HALF,
                "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": HALF,
                "processor_class": "LlavaOnevisionProcessor", "resample": 3, "rescale_factor": 1 / 255, "size": crop},
            "processor_config.json": {
                "image_token": "<image>", "num_image_tokens": (vision.image_size // vision.patch_size) ** 2,
                "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
                "vision_feature_select_strategy": config.vision_feature_select_strategy},
        }
    if family == "internvl3":
        tile = {"height": vision.image_size[0], "width": vision.image_size[1]}
        # InternVL3's releases: 1 to 12 tiles (and a thumbnail), tiled by the processor (its crop_to_patches), not by
        # the image processor's own setting.
        return {
            "preprocessor_config.json": {
                "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
                "do_resize": True, "image_mean": IMAGENET_MEAN, "image_processor_type": "GotOcr2ImageProcessorFast",
                "image_std": IMAGENET_STD, "max_patches": 12, "min_patches": 1, "processor_class": "InternVLProcessor",
                "resample": 3, "rescale_factor": 1 / 255, "size": tile},
            "processor_config.json": {"image_seq_length": config.image_seq_length,
                                      "processor_class": "InternVLProcessor"},
        }
    token_area = (vision.patch_size * vision.spatial_merge_size) ** 2  # pixels per visual token
    patches = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                   merge_size=vision.spatial_merge_size)
    if family == "qwen3-vl":
        # Qwen3-VL's bounds: 64 to 16,384 tokens; here 4 to 256, so tests stay small.
        size = {"longest_edge": 256 * token_area, "shortest_edge": 4 * token_area}
        image = {"size": size, **patches, "image_mean": HALF, "image_std": HALF,
                 "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
        video = {"size": {"longest_edge": 256 * token_area * 2, "shortest_edge": 4 * token_area * 2}, **patches,
                 "image_mean": HALF, "image_std": HALF, "fps": 2, "do_sample_frames": True,
                 "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor"}
        return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}
    processor_class = "Qwen2_5_VLProcessor" if family == "qwen2.5-vl" else "Qwen2VLProcessor"
    # Qwen2-VL's and Qwen2.5-VL's bounds: 4 to 16,384 tokens (min_pixels, max_pixels); here 4 to 256.
    return {"preprocessor_config.json": {
        "min_pixels": 4 * token_area, "max_pixels": 256 * token_area, **patches, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class}}


def write_released_checkpoint(family: str, folder: str | Path, seed: int = 0) -> Path:
    """The tiny stock checkpoint of `family` (one of `FAMILIES`) in `folder`, laid out as its releases are."""
    from visor.backbones import backbone_for

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    folder = Path(folder)
    tokenizer = build_tokenizer({"llava-onevision": LLAVA_SPECIAL_TOKENS, "internvl3": INTERNVL_SPECIAL_TOKENS}.get(
        family, QWEN_SPECIAL_TOKENS))
    config = _model_config(family, tokenizer)
    torch.manual_seed(seed)
    model = backbone_for(config).stock_model_class(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "Qwen2Tokenizer"
    if family == "internvl3":
        settings["extra_special_tokens"] = INTERNVL_MARKERS
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    template = {"llava-onevision": LLAVA_ONEVISION_TEMPLATE, "qwen3-vl": QWEN3_VL_TEMPLATE,
                "internvl3": INTERNVL3_TEMPLATE}.get(family, QWEN2_VL_TEMPLATE)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    for name, content in _processor_files(family, config).items():
        (folder / name).write_text(json.dumps(content, indent=2))
    return folder


def write_open_visor_checkpoint(family: str, root: str | Path):
    """`family`'s released folder (ROOT/stock) converted to VISOR in ROOT/visor with open CA gates and a random CPE,
    so the image matters; returns (that folder, the model)."""
    from visor.backbones import checkpoint_config
    from visor.backbones import family as family_of
    from visor.convert import copy_processor

    root = Path(root)
    stock = write_released_checkpoint(family, root / "stock")
    model = family_of(checkpoint_config(stock)).VISOR_MODEL.from_stock(stock).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.attention_gate.fill_(0.8)
        model.position_encoding.conv.weight.normal_(0, 0.05)
    model.save_pretrained(root / "visor")
    copy_processor(stock, root / "visor")
    return root / "visor", model


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    for family in FAMILIES:
        print(write_released_checkpoint(family, Path(argv[0]) / family))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
