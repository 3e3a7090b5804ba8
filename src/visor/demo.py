"""`visor demo`: the interim main job. A tiny seeded VISOR model runs every configuration on one batch.

For each configuration it times the prefill, generates greedily (with the sparse KV cache) and prints one
table row: which layers ran as SA, the visual/text token counts, the prefill time, the LLM prefill FLOPs (from
`visor.flops`) with their ratio to the full model, the visual part of the KV cache and the generated ids.
Everything is random and offline, so the numbers show the mechanics, not quality.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from visor import presets
from visor.flops import llm_prefill_flops
from visor.modeling import VisorForConditionalGeneration

DEFAULT_IMAGE_SIZES = ((64, 128), (128, 128))
PROMPT_IDS = (1, 17, 42, 99)  # BOS + a few words before the image
QUESTION_IDS = (120, 77, 250, 31, 8)  # words after the image


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run every VISOR configuration of a tiny random model on one batch")
    parser.add_argument("--layers", type=int, default=6, help="text-model layers of the tiny model (default 6)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens to generate per prompt (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_main)


def _main(args) -> int:
    run_demo(num_layers=args.layers, new_tokens=args.new_tokens, seed=args.seed)
    return 0


def build_inputs(model, image_sizes=DEFAULT_IMAGE_SIZES, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch of random images with as many `<image>` tokens as the model's vision path produces."""
    config = model.config
    crop = config.vision_config.image_size
    crops = max(image_size_to_num_patches(size, config.image_grid_pinpoints, crop) for size in image_sizes)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(image_sizes), crops, 3, crop, crop, generator=generator)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        features = model.encode_images(pixel_values, sizes, None, 0)
    prompts = [
        list(PROMPT_IDS) + [config.image_token_id] * image.shape[0] + list(QUESTION_IDS[: 3 + row])
        for row, image in enumerate(features)
    ]
    length = max(map(len, prompts))
    pad = config.text_config.pad_token_id or 0
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=sizes)


def build_model(num_layers: int = 6, seed: int = 0) -> VisorForConditionalGeneration:
    """A seeded random stock tiny LLaVA-OV converted to VISOR (default schedule, fresh gates and CPE)."""
    torch.manual_seed(seed)
    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(num_layers)).eval()
    return VisorForConditionalGeneration.from_llava(stock).eval()


def run_demo(num_layers: int = 6, new_tokens: int = 8, seed: int = 0, out: TextIO | None = None) -> list[dict]:
    """Run every configuration on one batch; print a table (one row per configuration) and return its rows."""
    out = out or sys.stdout
    model = build_model(num_layers, seed)
    inputs = build_inputs(model, seed=seed)
    config = model.config
    valid = inputs["attention_mask"].bool()
    visual = ((inputs["input_ids"] == config.image_token_id) & valid).sum(dim=1).tolist()
    text = (valid.sum(dim=1) - torch.tensor(visual)).tolist()
    full_flops = sum(llm_prefill_flops(config, v, t, "full").total for v, t in zip(visual, text))
    pad = config.text_config.pad_token_id or 0

    header = ["config", "SA layers", "visual/text tokens", "prefill ms", "LLM prefill GFLOPs", "vs full",
              "visual KV bytes", "generated ids (sample 0)"]
    print(f"VISOR demo: tiny model, {num_layers} layers, CA layers {config.cross_attention_layers}, "
          f"batch of {len(visual)}", file=out)
    print(" | ".join(header), file=out)
    rows = []
    for index, sa_layers in enumerate(config.configurations):
        with torch.no_grad():
            start = time.perf_counter()
            model(**inputs, configuration=index, logits_to_keep=1)
            prefill_ms = (time.perf_counter() - start) * 1e3
            output = model.generate(
                **inputs, configuration=index, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                return_dict_in_generate=True,
            )
        generated = output.sequences[:, inputs["input_ids"].shape[1]:]
        method = sum(llm_prefill_flops(config, v, t, index).total for v, t in zip(visual, text))
        visual_kv = output.past_key_values.nbytes()["visual"]
        row = dict(configuration=index, sa_layers=list(sa_layers), visual_tokens=sum(visual), text_tokens=sum(text),
                   prefill_ms=prefill_ms, llm_prefill_flops=method, flops_ratio=method / full_flops,
                   kv_bytes_visual=visual_kv, generated=generated.tolist())
        cells = [str(index), str(list(sa_layers)), f"{sum(visual)}/{sum(text)}", f"{prefill_ms:.1f}",
                 f"{method / 1e9:.4f}", f"{method / full_flops:.3f}", str(visual_kv),
                 " ".join(map(str, generated[0].tolist()))]
        print(" | ".join(cells), file=out)
        rows.append(row)
    return rows
