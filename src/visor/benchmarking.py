"""What the benches share (`visor bench`, its `--train` and `--engine vllm` variants): the inference bench's plan,
validated before any model is built, models of a plan with seeded random weights, a timer that waits for the
accelerator, and a peak-memory sampler."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch

from visor.backbones import backbone_for, family
from visor.config import Schedule
from visor.device import available_memory_bytes, check_device, default_device
from visor.flops import kv_cache_bytes
from visor.presets import preset_config
from visor.reduction.prellm_video import check_video_backbone

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMAGE_VISUAL_TOKENS = (729, 2916, 7290)  # an image plan's default sweep


@dataclass(frozen=True)
class BenchPlan:
    """What to measure; validated on creation, before any model is built.

    A prompt holds one image of `visual_tokens` tokens (default `IMAGE_VISUAL_TOKENS`) or, with `video_frames`, one
    video of that many frames at the family's default frame resolution, whose tokens the adapter counts
    (`Backbone.video_tokens`): `visual_tokens` then holds each video's, in the order of `video_frames`."""

    preset: str
    visual_tokens: tuple[int, ...] | None = None
    text_tokens: int = 64
    repeats: int = 3
    decode_tokens: int = 8
    configurations: tuple[int, ...] | None = None  # VISOR configurations to run; None = all
    device: str = field(default_factory=default_device)
    dtype: str = "bfloat16"
    baselines: tuple[float, ...] = ()  # target FLOPs ratios of the token-reduction baselines; () = none
    cross_attention_key_value_heads: int | None = None  # CA blocks' K/V heads; None = the host layer's
    batch_sizes: tuple[int, ...] = ()  # batched decoding at these batch sizes; () = none
    batched_prefill: bool = False  # time the prefill of B prompts too (else their cache is one prefill's, repeated)
    kv_budget_gib: float | None = None  # memory for KV caches: how many requests each row fits
    end_to_end: bool = False  # also time the vision tower: time to first token
    video_frames: tuple[int, ...] = ()  # one video of each many frames per prompt instead of an image; () = images

    def __post_init__(self):
        config = self.config  # an unknown preset or a bad head count raises here
        if self.video_frames:
            object.__setattr__(self, "visual_tokens", self._video_visual_tokens())
        elif self.visual_tokens is None:
            object.__setattr__(self, "visual_tokens", IMAGE_VISUAL_TOKENS)
        if not self.visual_tokens or any(count <= 0 for count in self.visual_tokens):
            raise ValueError(f"visual tokens must be positive counts, got {list(self.visual_tokens)}")
        for name in ("text_tokens", "repeats", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        available = range(len(config.configurations))
        missing = [index for index in self.configurations or () if index not in available]
        if missing:
            raise ValueError(
                f"configurations {missing} do not exist: preset {self.preset!r} has configurations "
                f"0..{len(config.configurations) - 1} ({config.configurations})"
            )
        if any(not ratio >= 1 for ratio in self.baselines):
            raise ValueError(f"baseline FLOPs ratios must be >= 1, got {list(self.baselines)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if any(size < 1 for size in self.batch_sizes):
            raise ValueError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if self.batched_prefill and not self.batch_sizes:
            raise ValueError("batched prefill needs batch sizes (--batch-sizes)")
        if self.kv_budget_gib is not None:
            self._check_kv_budget()
        check_device(self.device)
        self._check_memory()
        if self.end_to_end and not self.video_frames:
            for visual in self.visual_tokens:  # raises where the family has no image of that many tokens
                backbone_for(self.config).nominal_pixel_inputs(visual)

    def _video_visual_tokens(self) -> tuple[int, ...]:
        """Each video's visual tokens, from the family's video geometry; a video plan's own bad input named."""
        if self.visual_tokens is not None:
            raise ValueError("a prompt holds one image of --visual-tokens or one video of --video-frames, not both")
        if any(frames <= 0 for frames in self.video_frames):
            raise ValueError(f"video frames must be positive counts, got {list(self.video_frames)}")
        backbone = backbone_for(self.config)  # a family without video, or without its geometry, is named here
        tokens = tuple(backbone.video_tokens(frames).visual_tokens for frames in self.video_frames)
        if self.baselines:  # the video reductions' own family check, named before any model is built
            check_video_backbone(self.config)
        for count in sorted(set(tokens)):  # a row is known by its tokens: one video per count
            same = [frames for frames, other in zip(self.video_frames, tokens) if other == count]
            if len(same) > 1:
                raise ValueError(f"videos of {same} frames have the same {count} visual tokens (the family packs "
                                 "frames into temporal patches): ask for one of them")
        for frames in self.video_frames:  # the text between a video's runs of tokens is the prompt's (see _prompt)
            between = len(backbone.video_layout(frames)) - 1
            if between >= self.text_tokens:
                raise ValueError(f"a video of {frames} frames takes {between} of the prompt's text tokens between its "
                                 f"runs of video tokens (its timestamps): text_tokens must be more than {between}, "
                                 f"got {self.text_tokens}")
        return tokens

    def frames_at(self, visual: int) -> int | None:
        """The frames of the video whose prompt has `visual` visual tokens (None in an image plan)."""
        return dict(zip(self.visual_tokens, self.video_frames)).get(visual)

    def _check_memory(self) -> None:
        """Refuse a plan whose largest prompt cannot fit in the device's free memory: found here, it is an error
        naming the sizes; found by the allocator, a traceback after minutes of benchmarking. The estimate is a
        floor (the weights and the allocator's slack come on top): the prompt's image features and one decoder
        layer's activations over it (hidden states, q/k/v/o, the MLP's three), for each prompt of a batched
        prefill, and the full model's KV cache of the prompt and its decoded tokens, once more per prompt of the
        largest batch."""
        element = DTYPES[self.dtype].itemsize
        text_config = self.config.text_config
        visual, batch = max(self.visual_tokens), max(self.batch_sizes, default=0)
        prompts = batch if self.batched_prefill else 1
        prompt = prompts * (visual * text_config.hidden_size + (visual + self.text_tokens) * (
            5 * text_config.hidden_size + 3 * text_config.intermediate_size)) * element
        cache = sum(kv_cache_bytes(self.config, visual, self.text_tokens + self.decode_tokens + 1,
                                   Schedule.full(self.config), element).values())
        needed, available = prompt + (1 + batch) * cache, available_memory_bytes(self.device)
        if needed > available:
            batches, smaller = (f" and batches of {batch}", " or smaller batches") if batch else ("", "")
            frames = self.frames_at(visual)
            sweep, fewer = (f"{frames} frames ({visual} visual tokens)", "frames") if frames else (
                f"{visual} visual tokens", "visual tokens")
            raise ValueError(
                f"at {sweep}{batches} the bench needs at least {needed / 2**30:,.1f} GiB (visual "
                f"features, a layer's activations, KV caches; weights not counted) but {self.device} has "
                f"{available / 2**30:,.1f} GiB free: ask for fewer {fewer}{smaller}")

    def _check_kv_budget(self) -> None:
        """The budget must hold at least one request of the cheapest VISOR configuration benched."""
        element_size = DTYPES[self.dtype].itemsize
        cheapest = min(
            (sum(kv_cache_bytes(self.config, min(self.visual_tokens), self.text_tokens, Schedule.of(self.config, index),
                                element_size).values()), index)
            for index in self.visor_configurations)
        if not self.kv_budget_gib * 2**30 >= cheapest[0]:
            raise ValueError(
                f"a KV budget of {self.kv_budget_gib:g} GiB holds no request: VISOR configuration {cheapest[1]}, the "
                f"cheapest here, needs {cheapest[0] / 2**20:.3g} MiB per request at {min(self.visual_tokens)} "
                f"visual tokens")

    @cached_property
    def config(self):
        """The preset with VISOR's default schedule (L/3 CA layers, nested SA configurations)."""
        return self._visor_config_class.from_stock_config(
            preset_config(self.preset), cross_attention_key_value_heads=self.cross_attention_key_value_heads)

    @cached_property
    def dense_config(self):
        """The preset as the stock model: every layer SA, no CA block, no CPE."""
        return self._visor_config_class.dense(preset_config(self.preset), position_encoding=False)

    @property
    def _visor_config_class(self):
        return family(preset_config(self.preset)).VISOR_MODEL.config_class

    @property
    def visor_configurations(self) -> tuple[int, ...]:
        return self.configurations if self.configurations is not None else tuple(range(len(self.config.configurations)))


def build_model(config, plan: BenchPlan):
    """A VISOR-class model of `config` with seeded random weights, in the plan's dtype, on its device."""
    torch.manual_seed(0)
    model = family(config).VISOR_MODEL._from_config(config, dtype=DTYPES[plan.dtype])
    return model.to(plan.device).eval()


class PeakMemory:
    """Peak memory inside a `with` block, in bytes (`bytes`): an accelerator's allocator peak, or on CPU the
    process's resident memory sampled every 5 ms from /proc (None where there is no /proc)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s, self.bytes = device, interval_s, None
        self._done = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and os.path.exists("/proc/self/statm"):
            self.bytes = _resident_bytes()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            self.bytes = max(self.bytes, _resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.bytes is not None:
            self._done.set()
            self._sampler.join()
            self.bytes = max(self.bytes, _resident_bytes())


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(device: torch.device, run):
    """(seconds, result) of `run()`, waiting for an accelerator to finish its queued work."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter() - start, result
