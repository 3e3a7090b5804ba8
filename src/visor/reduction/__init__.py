"""Training-free token-reduction baselines on the same LLaVA-OV model, and VISOR combined with token reduction.

One module per method, each with an entry point taking the method's own strength (e.g. `fastv(model, layer=2,
keep=0.5)`) and returning a model-like object with `.config`, a forward call and `.generate(...)`.
`apply_reduction(model, method, ratio)` picks that strength for a target LLM-prefill FLOPs ratio (see `budget`),
and `prefill_flops(model, inputs)` counts, with `visor.flops`, what each sample of a batch cost for the tokens
it kept in each layer. Every method with nothing reduced (keep 1, stride 1) is the model it wraps, exactly.

The video methods (`VIDEO_METHODS`: frame subsampling, EVS, video pooling, alone and under VISOR) reduce a video's
tokens before the LLM. They go through the same `apply_reduction`, matched on a video prompt
(`budget.reference_video_inputs`), but sit outside `METHODS`: every method there runs on image prompts (the
benchmarks' rows, `methods_for`), and a video method refuses a prompt without video.
"""

from __future__ import annotations

from visor.modeling.visor import VisorModel
from visor.reduction.budget import prefill_flops, reference_inputs, reference_video_inputs, solve_strength
from visor.reduction.dart import dart, dart_plan
from visor.reduction.evs import EVS, evs
from visor.reduction.fastv import fastv, fastv_plan
from visor.reduction.frame_sampling import FrameSampling, subsample_frames
from visor.reduction.hired import HiRED, hired
from visor.reduction.pool import Pooling, VideoPooling, pool, pool_video
from visor.reduction.prellm import PreLLMReduced, base_schedule, check_backbone, reduced_prefill_flops, supports
from visor.reduction.pruned import PruningPlan, pruned
from visor.reduction.pyramiddrop import pyramiddrop, pyramiddrop_plan
from visor.reduction.random_pruning import RandomSubset, random_plan, random_pruning
from visor.reduction.shortv import shortv, shortv_plan
from visor.reduction.sparsevlm import sparsevlm, sparsevlm_plan
from visor.reduction.prellm_video import (
    VideoReduced, check_video_backbone, is_video_reducer, supports_video, video_reduced_prefill_flops,
)
from visor.reduction.visionzip import VisionZip, visionzip

# method → (needs a VISOR model, its reduction at a strength in (0, 1]: the fraction of tokens kept; 1 / stride²
# for pooling; for ShortV the fraction of layers where visual tokens are *not* frozen). A reduction is data: a
# `PruningPlan` (in-LLM) or a visual reducer (pre-LLM), so its cost is known before any model is built.
_METHODS = {
    "fastv": (False, lambda config, kept: fastv_plan(config, keep=kept)),
    "random": (False, lambda config, kept: random_plan(config, keep=kept)),  # at FastV's layer, seed 0
    "dart": (False, lambda config, kept: dart_plan(config, keep=kept)),
    "pyramiddrop": (False, lambda config, kept: pyramiddrop_plan(config, ratio=kept)),
    "sparsevlm": (False, lambda config, kept: sparsevlm_plan(config, keep=kept)),
    "shortv": (False, lambda config, kept: shortv_plan(config, fraction=1 - kept)),
    "visionzip": (False, lambda config, kept: VisionZip(kept)),
    "hired": (False, lambda config, kept: HiRED(kept)),
    "pool": (False, lambda config, kept: Pooling(kept ** -0.5)),
    "random-pre-llm": (False, lambda config, kept: RandomSubset(kept)),  # seed 0
    "visor+pool": (True, lambda config, kept: Pooling(kept ** -0.5)),
    "visor+visionzip": (True, lambda config, kept: VisionZip(kept)),
}
METHODS = tuple(_METHODS)
# The same for videos (`visor.reduction.prellm_video`): the fraction of a video's frames, or tokens, kept.
_VIDEO_METHODS = {
    "frames": (False, lambda config, kept: FrameSampling(1 / kept)),
    "evs": (False, lambda config, kept: EVS(1 - kept)),
    "pool-video": (False, lambda config, kept: VideoPooling(kept ** -0.5)),
    "visor+frames": (True, lambda config, kept: FrameSampling(1 / kept)),
    "visor+evs": (True, lambda config, kept: EVS(1 - kept)),
    "visor+pool-video": (True, lambda config, kept: VideoPooling(kept ** -0.5)),
}
VIDEO_METHODS = tuple(_VIDEO_METHODS)
_ALL_METHODS = _METHODS | _VIDEO_METHODS


def apply_reduction(model, method: str, ratio: float, inputs: dict | None = None):
    """`model` reduced by `method` at the strength whose LLM prefill FLOPs are about full / `ratio` on `inputs`
    (a prompt batch like the ones it will see; default `budget.reference_inputs`, for a video method
    `budget.reference_video_inputs`).

    `visor+…` methods take a VISOR model (run at its largest configuration); the others a stock model.
    """
    if method in _ALL_METHODS and _ALL_METHODS[method][0] != isinstance(model, VisorModel):
        kind = "a VISOR model" if _ALL_METHODS[method][0] else "a stock model (not VISOR)"
        raise ValueError(f"{method} needs {kind}, got {type(model).__name__}")
    reduction = reduction_for(model.config, method, ratio, inputs)
    if isinstance(reduction, PruningPlan):
        return pruned(model, reduction)
    return (VideoReduced if is_video_reducer(reduction) else PreLLMReduced)(model, reduction)


def methods_for(config) -> tuple[str, ...]:
    """The methods that run on `config`'s family: the in-LLM ones everywhere, the pre-LLM ones where `supports`."""
    if supports(config):
        return METHODS
    return tuple(method for method in METHODS if isinstance(_METHODS[method][1](config, 1.0), PruningPlan))


def video_methods_for(config) -> tuple[str, ...]:
    """The video methods that run on `config`'s family (`supports_video`; none elsewhere)."""
    return VIDEO_METHODS if supports_video(config) else ()


def reduction_at(config, method: str, strength: float):
    """What `method` does at `strength` (a `PruningPlan`, a visual or a video reducer), before any matching."""
    if method not in _ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_ALL_METHODS)}")
    reduction = _ALL_METHODS[method][1](config, strength)
    if is_video_reducer(reduction):
        check_video_backbone(config)
    elif not isinstance(reduction, PruningPlan):
        check_backbone(config)
    return reduction


def reduction_for(config, method: str, ratio: float, inputs: dict | None = None):
    """What `method` does at `ratio` (a `PruningPlan`, a visual or a video reducer), matched on `inputs` (a prompt
    batch; default `budget.reference_inputs`, for a video method `budget.reference_video_inputs`)."""
    video = is_video_reducer(reduction_at(config, method, 1.0))  # an unknown method is refused before any matching
    if inputs is None:
        inputs = (reference_video_inputs if video else reference_inputs)(config)
    schedule = base_schedule(config, config.largest_configuration if _ALL_METHODS[method][0] else None)

    def cost(kept: float, inputs: dict):
        reduction = reduction_at(config, method, kept)
        if isinstance(reduction, PruningPlan):
            return reduction.prefill_flops(config, inputs)
        if video:
            return video_reduced_prefill_flops(config, reduction, inputs, schedule)
        return reduced_prefill_flops(config, reduction, inputs, schedule)

    return reduction_at(config, method, solve_strength(config, cost, ratio, inputs))


__all__ = ["METHODS", "VIDEO_METHODS", "apply_reduction", "dart", "evs", "fastv", "hired", "methods_for", "pool",
           "pool_video", "prefill_flops", "pyramiddrop", "random_pruning", "reduction_at", "reduction_for", "shortv",
           "sparsevlm", "subsample_frames", "video_methods_for", "visionzip"]
