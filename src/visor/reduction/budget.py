"""Apply a method at a requested LLM-prefill FLOPs ratio, and count what a reduced model costs per sample.

Every method has one strength in (0, 1], the fraction it keeps (a keep ratio, or 1 / stride² for pooling), and
its cost grows with it. `apply_reduction` finds, by bisection on `visor.flops` arithmetic (nothing runs), the
largest strength whose cost on a reference prompt is at most full-model FLOPs / `ratio`. The reference prompt
is one image of the largest size the family's processor makes (LLaVA-OV: its largest anyres pinpoint) with `REFERENCE_TEXT` text tokens; since cost depends on
the image size, the ratio reached on other images differs somewhat, and `prefill_flops` reports the real cost
per sample. `visor+…` methods run VISOR's largest configuration (its best, as the paper's "VISOR + token
pooling") and reduce tokens on top of it; when that configuration alone already saves more than asked, they
keep every token.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from visor.backbones import backbone_for
from visor.config import Schedule
from visor.flops import image_tokens, prompt_prefill_flops
from visor.modeling.visor import VisorModel
from visor.reduction.prellm import base_schedule

REFERENCE_TEXT = 32
BISECTION_STEPS = 40
WEAKEST_TRIED = 1e-4  # the strongest reduction tried: a strength of 1e-4 keeps one token in most settings

# cost(strength, inputs) → (B,) prefill FLOPs of the method at that strength, from arithmetic alone
Cost = Callable[[float, dict], torch.Tensor]


def solve_strength(config, cost: Cost, ratio: float, inputs: dict | None = None) -> float:
    """The largest strength s in (0, 1] with full FLOPs / cost(s) >= ratio on `inputs` (summed over the batch;
    default the reference prompt).

    Ratio 1 is the off switch: strength 1 (a method's own scoring overhead may then cost a little more).
    """
    if not ratio >= 1:
        raise ValueError(f"the FLOPs ratio must be >= 1 (1 = the full model), got {ratio}")
    inputs = reference_inputs(config) if inputs is None else inputs
    full = int(prompt_prefill_flops(config, inputs, Schedule.full(config)).sum())

    def reaches(strength: float) -> bool:
        return full >= ratio * int(cost(strength, inputs).sum())

    if ratio == 1 or reaches(1.0):
        return 1.0
    if not reaches(WEAKEST_TRIED):
        warnings.warn(f"{ratio}x is out of reach for this method here; using its strongest reduction instead")
        return WEAKEST_TRIED
    low, high = WEAKEST_TRIED, 1.0  # reaches(low) and not reaches(high)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if reaches(middle) else (low, middle)
    return low


def prefill_flops(model, inputs: dict) -> torch.LongTensor:
    """(B,) LLM prefill FLOPs per sample of a (reduced or plain) model on a prompt batch.

    Reduced models count the tokens they keep in each layer; a plain stock model counts as "full", a plain
    VISOR model as its largest configuration.
    """
    if hasattr(model, "prefill_flops"):
        return model.prefill_flops(inputs)
    largest = model.config.largest_configuration if isinstance(model, VisorModel) else None
    return prompt_prefill_flops(model.config, inputs, base_schedule(model.config, largest))


def reference_video_inputs(config) -> dict:
    """One prompt: BOS-like text, a video of the family's default frame count, then the rest of the text (the
    video's pixels on the meta device: the count reads their shape only)."""
    backbone = backbone_for(config)
    frames = backbone.default_video_frames
    visual = backbone.video_tokens(frames).visual_tokens
    text_id = config.text_config.pad_token_id or 0
    before = REFERENCE_TEXT // 4
    ids = [text_id] * before + [config.video_token_id] * visual + [text_id] * (REFERENCE_TEXT - before)
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values_videos=counted_video_pixels(config, frames))


def counted_video_pixels(config, frames: int) -> torch.Tensor:
    """One video's pixels as the FLOP count reads them: (1, frames, 3, side, side) on the meta device (only the shape
    matters)."""
    side = config.vision_config.image_size
    return torch.empty(1, frames, 3, side, side, device="meta")


def reference_inputs(config) -> dict:
    """One prompt: BOS-like text, an image of the largest size, then the rest of the text."""
    size = backbone_for(config).largest_image_size()
    visual = image_tokens(config, tuple(size)).visual_tokens
    text_id = config.text_config.pad_token_id or 0
    before = REFERENCE_TEXT // 4
    ids = [text_id] * before + [config.image_token_id] * visual + [text_id] * (REFERENCE_TEXT - before)
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_sizes=torch.tensor([size]))
