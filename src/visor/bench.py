"""`visor bench`: LLM prefill FLOPs next to measured prefill time, decode time and KV-cache bytes.

For one preset's shapes (random weights, bf16 by default) it runs, at each visual-token count of a sweep with a
fixed text length, the full stock model, every VISOR configuration and the text-only floor, and writes
`bench.json` plus two plots: FLOPs against visual tokens, and measured prefill speed-up against FLOPs ratio.

What is measured, and how:
- The language model only. The vision tower's cost does not depend on the method, so its FLOPs come from
  `visor.flops` (`nominal_vision_flops`: for LLaVA-OV the ceil(N_v / tokens per crop) crops that give N_v tokens
  before anyres packing) and the model gets precomputed (random) image features instead of pixels.
- Every row runs through the preset family's VISOR class: the full model is its config's `dense(...)` (every layer
  SA, no CA, no CPE), which equals the stock model exactly; the text-only floor is that same model on the text
  tokens alone. The prompt is the image followed by the text (for Qwen-VL one image of exactly N_v tokens, in the
  grid `Backbone.nominal_image_inputs` gives, which sets its M-RoPE positions).
- Prefill: the median of `repeats` runs after one warm-up, with the KV cache built (as generation does) and
  logits on the last position only. Decoding: the median time of `decode_tokens` single-token steps on that
  cache, after one warm-up step. KV bytes: the cache right after prefill, split into visual and text.
- Token-reduction baselines (`--baselines 2,4,8`, `visor.reduction`): one row per method and target FLOPs
  ratio, its strength matched on this very prompt. In-LLM methods (FastV, PyramidDrop, SparseVLM, ShortV) run
  their own layer loop on the full model's weights. Pre-LLM methods (pooling, VisionZip, HiRED) hand the language
  model fewer tokens and nothing else, so their LLM rows are the full model (VISOR's largest configuration for
  `visor+…`) on the largest visual-token count k that reaches the ratio (`llm_visual_tokens`); which k tokens
  they keep changes accuracy, not LLM cost. Their vision-side scoring (VisionZip, HiRED) is not in `vision_flops`.
  They exist for LLaVA-OV only (`reduction.methods_for`); on the other families the in-LLM methods run alone.
- Batched decoding (`--batch-sizes 1,8,32`): for every row, B copies of its prompt decode together. Their cache is
  the row's prefill cache repeated B times (what a batched prefill of B identical prompts leaves, tested), unless
  `--batched-prefill` times that prefill itself (on a CPU it is B times the work of one; on a GPU it shows what
  batching gains). Per batch size: decode seconds per step and tokens/s, the batch's KV bytes, the peak memory of
  building the batch's cache and decoding it (an accelerator's allocator peak; on CPU the process's resident
  memory sampled every 5 ms), and the bytes a decode step reads (every weight the step uses plus the batch's
  cache): a decode step that is bound by memory traffic speeds up by that ratio, so the measured decode speed-up
  over the full model is set against it.
- End to end (`--end-to-end`): the vision tower and projector on the image `nominal_vision_flops` prices, from
  random pixels (`Backbone.nominal_pixel_inputs`), timed once per visual-token count (it is the same for every
  method), so that time to first token = vision + LLM prefill; the text-only floor has no image and no such time.
- Video (`--video-frames 8,32`): instead of the image, each prompt holds one video of N frames at the family's
  default frame resolution (LLaVA-OV: every frame one crop of the vision tower's size, its patch grid pooled 2x2,
  one newline after the last frame; Qwen2.5-VL and Qwen3-VL: the largest square frame the stock video processor
  keeps whole, two frames to a temporal patch; Qwen3-VL's bounds hold all the frames, so its frames shrink as the
  video grows), as random precomputed video features in the video token's slots (Qwen3-VL: a run per temporal
  patch, one of the prompt's text tokens between two where its timestamps stand, `Backbone.video_layout`); its visual
  tokens are what the adapter's video geometry gives (`Backbone.video_tokens`), its vision FLOPs
  `video_vision_flops`, and `--end-to-end` times the stock video path on N frames of random pixels
  (`Backbone.nominal_video_pixel_inputs`). Its rows carry `video_frames`. Its baselines are the video reductions
  (`reduction.VIDEO_METHODS`: frame subsampling, EVS-style pruning, video pooling, alone and under VISOR; LLaVA-OV),
  each matched on this prompt like the pre-LLM methods and timed the same way: the base model on the tokens it
  keeps (`llm_visual_tokens`); their vision FLOPs and, with `--end-to-end`, vision time are the reducer's own
  path (frame subsampling sends fewer frames through the tower; EVS and pooling all of them, their own similarity
  and pooling work timed but, like the image methods' scoring, not in `vision_flops`).
- `--kv-budget GIB`: how many requests' caches (the prompt's, after prefill) fit in that much memory, per row:
  what a serving engine's KV pool would hold after the weights.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from tqdm import tqdm

from visor import reduction
from visor.backbones import backbone_for
from visor.benchmarking import DTYPES, BenchPlan, PeakMemory, build_model, timed
from visor.cli import comma_separated, command
from visor.config import Schedule
from visor.device import default_device
from visor.files import save_figure, write_json
from visor.flops import (
    decode_flops_per_token,
    layerwise_decode_flops_per_token,
    llm_prefill_flops,
    nominal_vision_flops,
    video_vision_flops,
)
from visor.presets import PRESETS
from visor.reduction.budget import counted_video_pixels, solve_strength
from visor.reduction.prellm_video import is_video_reducer
from visor.reduction.pruned import PruningPlan, kept_count, pruned




@dataclass
class BatchedDecoding:
    """B copies of a row's prompt decoding together (see the module notes)."""

    batch_size: int
    prefill_s: float | None  # the batched prefill (`batched_prefill`); None: not timed
    decode_s_per_step: float  # median of `decode_tokens` steps, each one token for all B prompts
    decode_tokens_per_s: float
    kv_bytes: int  # the batch's cache after prefill
    bytes_read_per_step: int  # the weights a decode step uses + the batch's cache
    peak_memory_bytes: int | None  # None: not measurable on this device
    decode_speedup: float | None = None  # full model's decode seconds per step at this batch size / this row's
    bytes_read_ratio: float | None = None  # full model's bytes read per step at this batch size / this row's


@dataclass
class BenchRow:
    method: str  # "full", "visor", "text-only" or a `visor.reduction` method
    configuration: int | None  # VISOR configuration index (None for full and text-only)
    visual_tokens: int
    text_tokens: int
    llm_prefill_flops: int
    prefill_s: float
    decode_s_per_token: float
    kv_bytes_visual: int
    kv_bytes_text: int
    self_attention_layers: list[int]  # the layers that run over [visual; text]
    decode_flops_per_token: int  # analytic, first generated token
    vision_flops: int  # vision tower + projector on the prompt's image or video (the same for every method)
    flops_ratio: float | None = None  # full model's LLM prefill FLOPs / this row's
    speedup: float | None = None  # full model's measured prefill seconds / this row's
    setting: str | None = None  # a baseline's target FLOPs ratio, e.g. "4x"
    llm_visual_tokens: int | None = None  # visual tokens a pre-LLM baseline hands the language model
    requests_in_budget: int | None = None  # prompts' caches that fit `kv_budget_gib`
    vision_s: float | None = None  # `end_to_end`: the vision tower + projector on this row's image
    time_to_first_token_s: float | None = None  # vision_s + prefill_s
    time_to_first_token_speedup: float | None = None  # the full model's / this row's
    batched: list[BatchedDecoding] = field(default_factory=list)
    video_frames: int | None = None  # a video plan's: the prompt's video has this many frames (None: an image)


def run_bench(plan: BenchPlan) -> list[BenchRow]:
    """Measure every (method, configuration, visual tokens) row of `plan`; rows sorted by visual tokens."""
    config = plan.config
    dense = [("full", None, visual) for visual in plan.visual_tokens]
    dense += [("text-only", None, visual) for visual in plan.visual_tokens]
    sparse = [("visor", index, visual) for visual in plan.visual_tokens for index in plan.visor_configurations]
    methods = reduction.video_methods_for(config) if plan.video_frames else reduction.methods_for(config)
    baselines = [(method, ratio, visual) for visual in plan.visual_tokens for ratio in plan.baselines
                 for method in methods]
    on_visor = [spec for spec in baselines if spec[0].startswith("visor+")]
    on_full = [spec for spec in baselines if not spec[0].startswith("visor+")]
    rows = []
    with tqdm(total=len(dense) + len(sparse) + len(baselines), desc="visor bench", unit="row") as progress:
        for model_config, specs, reduced in ((plan.dense_config, dense, on_full), (config, sparse, on_visor)):
            progress.set_postfix_str(f"building {plan.preset} ({'full' if specs is dense else 'VISOR'})")
            model = build_model(model_config, plan)
            if plan.end_to_end and specs is dense:
                progress.set_postfix_str("vision tower")
                vision_seconds = {visual: _vision_seconds(model, plan, visual) for visual in plan.visual_tokens}
            for method, index, visual in specs:
                progress.set_postfix_str(f"{method} {'' if index is None else index} Nv={visual}")
                rows.append(_measure(model, plan, method, index, visual))
                progress.update()
            for method, ratio, visual in reduced:
                progress.set_postfix_str(f"{method} {ratio:g}x Nv={visual}")
                rows.append(_measure_baseline(model, plan, method, ratio, visual))
                progress.update()
            del model
            gc.collect()
    order = {"full": 0, "visor": 1, **{method: 2 + i for i, method in enumerate(reduction.METHODS + reduction.VIDEO_METHODS)},
             "text-only": 99}
    rows.sort(key=lambda row: (row.visual_tokens, order[row.method], row.configuration or 0,
                               float((row.setting or "0x")[:-1])))
    for row in rows:
        full = next(other for other in rows if other.method == "full" and other.visual_tokens == row.visual_tokens)
        row.flops_ratio = full.llm_prefill_flops / row.llm_prefill_flops
        row.speedup = full.prefill_s / row.prefill_s
        for batch, full_batch in zip(row.batched, full.batched, strict=True):
            batch.decode_speedup = full_batch.decode_s_per_step / batch.decode_s_per_step
            batch.bytes_read_ratio = full_batch.bytes_read_per_step / batch.bytes_read_per_step
        if plan.kv_budget_gib is not None:
            row.requests_in_budget = math.floor(plan.kv_budget_gib * 2**30 / (row.kv_bytes_visual + row.kv_bytes_text))
        if plan.end_to_end and row.method != "text-only":
            if row.vision_s is None:  # a video reduction times its own vision path
                row.vision_s = vision_seconds[row.visual_tokens]
            row.time_to_first_token_s = row.vision_s + row.prefill_s
            row.time_to_first_token_speedup = (vision_seconds[row.visual_tokens] + full.prefill_s) / row.time_to_first_token_s
    return rows


@torch.inference_mode()
def _measure(model, plan: BenchPlan, method: str, configuration: int | None, visual: int) -> BenchRow:
    config, text = plan.config, plan.text_tokens
    schedule = {"visor": lambda: Schedule.of(config, configuration), "full": lambda: Schedule.full(config),
                "text-only": Schedule.text_only}[method]()
    in_llm = 0 if method == "text-only" else visual
    input_ids, text_ids, images = _prompt(model, plan, in_llm, seed=visual)
    inputs = dict(input_ids=input_ids, **images, configuration=configuration, use_cache=True, logits_to_keep=1)
    return _row(plan, method, visual, _timings(model, plan, inputs, text_ids), configuration=configuration,
                llm_prefill_flops=llm_prefill_flops(config, visual, text, schedule, logits_tokens=1).total,
                self_attention_layers=sorted(schedule.self_attention),
                decode_flops_per_token=decode_flops_per_token(config, visual, text, schedule).total)


def _row(plan: BenchPlan, method: str, visual: int, timings: tuple, **measured) -> BenchRow:
    """A row from what every method shares: the prompt's sizes, `_timings`' results, the vision side's cost."""
    prefill_s, decode_s, kv_bytes, batched = timings
    return BenchRow(method=method, visual_tokens=visual, text_tokens=plan.text_tokens, prefill_s=prefill_s,
                    decode_s_per_token=decode_s, kv_bytes_visual=kv_bytes["visual"], kv_bytes_text=kv_bytes["text"],
                    batched=batched, **_vision_cost(plan, visual), **measured)


def _vision_cost(plan: BenchPlan, visual: int) -> dict:
    """The vision side of a prompt with `visual` tokens (its video's, in a video plan): the same for every method
    (see the module notes)."""
    frames = plan.frames_at(visual)
    if frames is None:
        return dict(vision_flops=nominal_vision_flops(plan.config, visual).total)
    return dict(vision_flops=video_vision_flops(plan.config, frames).total, video_frames=frames)


@torch.inference_mode()
def _measure_baseline(model, plan: BenchPlan, method: str, ratio: float, visual: int) -> BenchRow:
    """A token-reduction baseline at `ratio` on the prompt with `visual` visual tokens (see the module notes)."""
    config, text = plan.config, plan.text_tokens
    input_ids, text_ids, images = _prompt(model, plan, visual, seed=visual)
    counted = dict(input_ids=input_ids.cpu())
    setting = f"{ratio:g}x"
    on_visor = method.startswith("visor+")
    base, configuration = ("visor", config.largest_configuration) if on_visor else ("full", None)
    unmatched = reduction.reduction_at(config, method, 1.0)
    if is_video_reducer(unmatched):
        return _measure_video_baseline(model, plan, method, ratio, visual, counted, base, configuration)
    if isinstance(unmatched, PruningPlan):  # in the LLM: its own layer loop
        pruning = reduction.reduction_for(config, method, ratio, inputs=counted)
        inputs = dict(input_ids=input_ids, **images, use_cache=True, logits_to_keep=1)
        timings = _timings(pruned(model, pruning), plan, inputs, text_ids)
        per_layer = pruning.visual_per_layer(config, counted)[0].tolist()
        return _row(plan, method, visual, timings, configuration=None, setting=setting,
                    llm_prefill_flops=int(pruning.prefill_flops(config, counted)[0]),
                    self_attention_layers=[layer for layer in range(config.num_layers) if layer not in pruning.frozen],
                    decode_flops_per_token=layerwise_decode_flops_per_token(
                        config, [text + v + 1 for v in per_layer]).total)
    schedule = Schedule.of(config, configuration) if on_visor else Schedule.full(config)

    def cost(kept: float, inputs: dict) -> torch.Tensor:
        return torch.tensor([llm_prefill_flops(config, kept_count(visual, kept), text, schedule).total])

    kept = kept_count(visual, solve_strength(config, cost, ratio, inputs=counted))
    return replace(_measure(model, plan, base, configuration, kept), method=method, visual_tokens=visual,
                   setting=setting, llm_visual_tokens=kept, **_vision_cost(plan, visual))


def _measure_video_baseline(model, plan: BenchPlan, method: str, ratio: float, visual: int, counted: dict, base: str,
                            configuration: int | None) -> BenchRow:
    """A video reduction at `ratio` on the prompt of one video of `visual` tokens: the base model timed on the
    tokens the reducer keeps (handed on as image tokens, as `VideoReduced` hands them), its vision side the
    reducer's own (see the module notes)."""
    config, frames = plan.config, plan.frames_at(visual)
    counted = dict(counted, pixel_values_videos=counted_video_pixels(config, frames))
    reducer = reduction.reduction_for(config, method, ratio, inputs=counted)
    kept = reducer.kept_tokens(config, frames)
    row = replace(_measure(model, plan, base, configuration, kept), method=method, visual_tokens=visual,
                  setting=f"{ratio:g}x", llm_visual_tokens=kept, vision_flops=reducer.vision_flops(config, frames),
                  video_frames=frames)
    if plan.end_to_end:
        row.vision_s = _vision_seconds(model, plan, visual, reducer)
    return row


def _prompt(model, plan: BenchPlan, visual: int, seed: int):
    """(input_ids (1, N_v + N_t), text ids, the image's (or video's) arguments: random features (N_v, d) and what
    positions need): the image (video), then the text. A video whose family's processor writes text between its
    runs of tokens (`Backbone.video_layout`) takes that text from the prompt's."""
    config, device, backbone = plan.config, torch.device(plan.device), backbone_for(plan.config)
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(0, config.text_config.vocab_size, (plan.text_tokens,), generator=generator)
    text_ids[backbone.visual_token_mask(text_ids)] = 0
    frames = plan.frames_at(visual) if visual else None
    if frames is None:
        input_ids = torch.cat([torch.full((visual,), config.image_token_id), text_ids])
    else:  # the video's runs of tokens with a text token between two (Qwen3-VL's timestamps), then the text
        first, *runs = backbone.video_layout(frames)
        ids, text = [config.video_token_id] * first, text_ids.tolist()
        for run in runs:
            ids += [text.pop(0)] + [config.video_token_id] * run
        input_ids = torch.tensor(ids + text)
    input_ids = input_ids[None].to(device)
    if not visual:
        return input_ids, text_ids, {}
    features = torch.randn(visual, config.text_config.hidden_size, generator=generator).to(device, model.dtype)
    if frames is None:
        extra, name = backbone.nominal_image_inputs(visual), "image_features"
    else:
        extra, name = backbone.nominal_video_inputs(frames), "video_features"
    return input_ids, text_ids, {name: [features], **{key: value.to(device) for key, value in extra.items()}}


def _timings(model, plan: BenchPlan, inputs: dict, text_ids: torch.Tensor):
    """(median prefill seconds, median decode seconds per token, KV bytes after prefill, batched decoding at
    `plan.batch_sizes`) of one prompt."""
    device = torch.device(plan.device)
    prefill_times = []
    for _ in range(plan.repeats + 1):  # the first run is the warm-up
        output = None  # free the previous run's cache first
        seconds, output = timed(device, lambda: model(**inputs))
        prefill_times.append(seconds)
    cache = output.past_key_values
    del output
    kv_bytes = cache.nbytes()
    batched = [_batched_decoding(model, plan, inputs, cache, text_ids, size) for size in plan.batch_sizes]
    decode_s = _decode_seconds(model, plan, cache, text_ids)
    del cache
    gc.collect()
    return statistics.median(prefill_times[1:]), decode_s, kv_bytes, batched


def _decode_seconds(model, plan: BenchPlan, cache, text_ids: torch.Tensor, batch: int = 1) -> float:
    """Median seconds of `plan.decode_tokens` decode steps (one token for each of the cache's `batch` prompts) after
    one warm-up step. The cache grows by the steps' tokens."""
    device = torch.device(plan.device)
    step = dict(input_ids=text_ids[:1].expand(batch, 1).to(device), past_key_values=cache, use_cache=True)
    decode_times = [timed(device, lambda: model(**step))[0] for _ in range(plan.decode_tokens + 1)]
    return statistics.median(decode_times[1:])


def _batched_decoding(model, plan: BenchPlan, inputs: dict, cache, text_ids: torch.Tensor, size: int) -> BatchedDecoding:
    """`size` copies of the prompt decoding together, from `cache` (the prompt's, left unchanged) repeated or from a
    timed batched prefill."""
    device = torch.device(plan.device)
    with PeakMemory(device) as peak:
        if plan.batched_prefill:
            prefill_s, output = timed(device, lambda: model(**_repeated(inputs, size)))
            batch_cache = output.past_key_values
            del output
        else:
            prefill_s, batch_cache = None, copy.deepcopy(cache)
            batch_cache.reorder_cache(torch.zeros(size, dtype=torch.long, device=device))
        kv_bytes = sum(batch_cache.nbytes().values())
        decode_s = _decode_seconds(model, plan, batch_cache, text_ids, size)
        del batch_cache
    return BatchedDecoding(batch_size=size, prefill_s=prefill_s, decode_s_per_step=decode_s,
                           decode_tokens_per_s=size / decode_s, kv_bytes=kv_bytes,
                           bytes_read_per_step=decode_weight_bytes(model) + kv_bytes, peak_memory_bytes=peak.bytes)


def _repeated(inputs: dict, size: int) -> dict:
    """A one-prompt model call's inputs for `size` copies of that prompt: tensors (input_ids, one row per image such
    as image_grid_thw) and the list of image features repeated along the batch."""
    repeated = {}
    for name, value in inputs.items():
        if isinstance(value, list):
            value = value * size
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value.repeat(size, *[1] * (value.dim() - 1))
        repeated[name] = value
    return repeated


def decode_weight_bytes(model) -> int:
    """Bytes of the weights a decode step uses: the language model's layers, its final norm and the lm_head, and the
    CA blocks (whose key/value projections, cached at prefill, are counted though not run). Not the vision tower,
    projector, CPE or router; the input embedding table only where it is the lm_head's weight."""
    parts = [backbone_for(model.config).language_model(model), model.lm_head,
             getattr(model, "cross_attention", torch.nn.Module())]
    embedding = model.get_input_embeddings().weight
    weights = {id(weight): weight for part in parts for weight in part.parameters()}
    if embedding is not model.get_output_embeddings().weight:
        weights.pop(id(embedding))
    return sum(weight.numel() * weight.element_size() for weight in weights.values())


@torch.inference_mode()
def _vision_seconds(model, plan: BenchPlan, visual: int, reducer=None) -> float:
    """Median seconds of the stock vision path (tower, projector, packing or pooling) on the image of `visual`
    tokens that `nominal_vision_flops` prices, or in a video plan on the video `video_vision_flops` prices (through
    a video `reducer`'s own path when given), after one warm-up."""
    device, backbone, frames = torch.device(plan.device), backbone_for(model.config), plan.frames_at(visual)
    inputs, encode = ((backbone.nominal_pixel_inputs(visual), backbone.encode_images) if frames is None else
                      (backbone.nominal_video_pixel_inputs(frames), backbone.encode_videos))
    pixels = {name: value.to(device, model.dtype) if value.is_floating_point() else value.to(device)
              for name, value in inputs.items()}
    if reducer is None:
        def run():
            return encode(model, visual, **pixels)
    else:
        def run():
            return reducer.video_features(model, pixels["pixel_values_videos"])
    times = [timed(device, run)[0] for _ in range(plan.repeats + 1)]
    return statistics.median(times[1:])


# ---- outputs -----------------------------------------------------------------------------------------------------
def _label(row: BenchRow) -> str:
    if row.method == "visor":
        return f"VISOR {row.configuration} ({len(row.self_attention_layers)} SA)"
    if row.setting is not None:
        return f"{row.method} {row.setting}"
    return row.method


def _record(row: BenchRow) -> dict:
    """A row as bench.json holds it: an image row without `video_frames` (image runs' files keep their fields)."""
    record = asdict(row)
    if row.video_frames is None:
        del record["video_frames"]
    return record


def _sweep(row: BenchRow) -> str:
    """What a row's prompt holds, for titles: "N visual tokens", or "F frames (N visual tokens)" for a video."""
    if row.video_frames is None:
        return f"{row.visual_tokens} visual tokens"
    return f"{row.video_frames} frames ({row.visual_tokens} visual tokens)"


def write_outputs(rows: list[BenchRow], output: str | Path) -> list[Path]:
    """`bench.json`, `flops.png`, `speedup.png` and, with batched decoding, `decode.png` in `output`; returns
    their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "bench.json", output / "flops.png", output / "speedup.png"]
    write_json(paths[0], [_record(row) for row in rows])

    lines: dict[str, list[BenchRow]] = {}
    for row in rows:
        lines.setdefault(_label(row), []).append(row)
    visor_labels = [label for label in lines if label.startswith("VISOR")]
    palette = colormaps["viridis"].resampled(max(1, len(visor_labels)))
    colors = {"full": "black", "text-only": "grey", **{label: palette(i) for i, label in enumerate(visor_labels)}}
    baseline_labels = [label for label in lines if label not in colors]
    others = colormaps["tab20"].resampled(max(1, len(baseline_labels)))
    colors |= {label: others(i) for i, label in enumerate(baseline_labels)}

    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.subplots()
    for label, series in lines.items():
        axes.plot([row.visual_tokens for row in series], [row.llm_prefill_flops for row in series],
                  marker="o", label=label, color=colors[label])
    video = "" if rows[0].video_frames is None else " of one video (" + ", ".join(
        f"{frames} frames" for frames in sorted({row.video_frames for row in rows})) + ")"
    axes.set(xlabel="visual tokens" + video, ylabel="LLM prefill FLOPs", yscale="log",
             title=f"LLM prefill FLOPs ({rows[0].text_tokens} text tokens)")
    axes.legend(fontsize="small")
    save_figure(figure, paths[1])

    figure = Figure(figsize=(6, 6), layout="constrained")
    axes = figure.subplots()
    for label, series in lines.items():
        axes.scatter([row.flops_ratio for row in series], [row.speedup for row in series], label=label,
                     color=colors[label])
    values = [value for row in rows for value in (row.flops_ratio, row.speedup)]
    limits = [min(values) / 1.2, max(values) * 1.2]
    axes.plot(limits, limits, color="grey", linestyle="--", label="y = x")
    axes.set(xscale="log", yscale="log", xlim=limits, ylim=limits, xlabel="FLOPs ratio (full / method)",
             ylabel="measured prefill speed-up (full / method)", title="Measured speed-up vs FLOPs ratio")
    axes.legend(fontsize="small")
    save_figure(figure, paths[2])
    if rows[0].batched:
        paths.append(save_figure(_decode_figure(lines, colors), output / "decode.png"))
    if rows[0].vision_s is not None:
        paths.append(save_figure(_time_to_first_token_figure(rows), output / "time-to-first-token.png"))
    return paths


def _panels_per_visual_count(rows: list[BenchRow], width: float, height: float) -> tuple[Figure, list]:
    """A figure with one panel (width × height inches) per visual-token count of `rows`: (figure, [(axes, count,
    what the prompt holds)])."""
    sweeps = sorted({(row.visual_tokens, _sweep(row)) for row in rows})
    figure = Figure(figsize=(width * len(sweeps), height), layout="constrained")
    return figure, [(axes, *sweep) for axes, sweep in zip(figure.subplots(1, len(sweeps), squeeze=False)[0], sweeps)]


def _time_to_first_token_figure(rows: list[BenchRow]) -> Figure:
    """Time to first token split into the vision side and the LLM prefill, one panel per visual-token count."""
    per_panel = len(rows) / len({row.visual_tokens for row in rows})
    figure, panels = _panels_per_visual_count(rows, width=6, height=0.5 * per_panel + 2)
    for axes, visual, sweep in panels:
        shown = [row for row in rows if row.visual_tokens == visual and row.vision_s is not None][::-1]
        labels = [_label(row) for row in shown]
        axes.barh(labels, [row.vision_s for row in shown], color="grey", label="vision tower + projector")
        axes.barh(labels, [row.prefill_s for row in shown], left=[row.vision_s for row in shown],
                  color="tab:blue", label="LLM prefill")
        axes.set(xlabel="seconds", title=f"Time to first token, {sweep}")
        axes.legend(fontsize="small")
    return figure


def _decode_figure(lines: dict[str, list[BenchRow]], colors: dict) -> Figure:
    """Decode tokens/s against batch size, one panel per visual-token count."""
    figure, panels = _panels_per_visual_count([row for series in lines.values() for row in series], width=5, height=4.5)
    for axes, visual, sweep in panels:
        for label, series in lines.items():
            for row in series:
                if row.visual_tokens == visual:
                    axes.plot([batch.batch_size for batch in row.batched],
                              [batch.decode_tokens_per_s for batch in row.batched],
                              marker="o", label=label, color=colors[label])
        axes.set(xscale="log", yscale="log", xlabel="requests decoding together (batch size)",
                 ylabel="decode tokens/s", title=f"Batched decoding, {sweep}")
        axes.legend(fontsize="small")
    return figure


# ---- command line ---------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="FLOPs, prefill/decode time and KV bytes: full model vs VISOR configurations vs text-only "
             "(and token-reduction baselines)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", required=True, help="model shapes: one of " + ", ".join(PRESETS))
    parser.add_argument("--visual-tokens", type=comma_separated(), default=None,
                        help="comma-separated visual-token counts (default 729,2916,7290; with --train "
                             "1458,2916,7290)")
    parser.add_argument("--video-frames", type=comma_separated(), default=BenchPlan.video_frames,
                        help="instead of an image, one video of each many frames per prompt, e.g. 8,32,64, at the "
                             "family's default frame resolution (its visual tokens: the family's video geometry)")
    parser.add_argument("--text-tokens", type=int, default=BenchPlan.text_tokens)
    parser.add_argument("--output", required=True, type=Path, help="folder for bench.json and the plots")
    parser.add_argument("--repeats", type=int, default=BenchPlan.repeats, help="timed prefill runs per row")
    parser.add_argument("--decode-tokens", type=int, default=BenchPlan.decode_tokens, help="timed decode steps")
    parser.add_argument("--configurations", type=comma_separated(), default=None,
                        help="VISOR configuration indices to run (default all)")
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", default=BenchPlan.dtype, choices=sorted(DTYPES))
    parser.add_argument("--baselines", type=comma_separated(float, "numbers"), default=BenchPlan.baselines,
                        help="token-reduction baselines at these FLOPs ratios, e.g. 2,4,8 (default none)")
    parser.add_argument("--cross-attention-heads", type=int, default=None, metavar="N",
                        help="key/value heads of VISOR's CA blocks (default: the host layer's; fewer project the "
                             "visual tokens more cheaply)")
    parser.add_argument("--batch-sizes", type=comma_separated(), default=BenchPlan.batch_sizes,
                        help="also decode this many copies of each prompt together, e.g. 1,8,32: tokens/s, KV "
                             "bytes, peak memory and bytes read per step (default none)")
    parser.add_argument("--batched-prefill", action="store_true",
                        help="with --batch-sizes, time the prefill of the whole batch too (default: the batch's "
                             "cache is one prompt's, repeated)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the vision tower on each image: time to first token = vision + LLM prefill")
    parser.add_argument("--kv-budget", type=float, default=None, metavar="GIB",
                        help="memory for KV caches in GiB: report how many requests each row fits")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: serve the full model and each VISOR configuration with vLLM and measure time to "
                             "first token, decoding at --batch-sizes concurrent requests (default 1,8,32) and the KV "
                             "pool each request takes (the serving environment: make serve-setup)")
    training = parser.add_argument_group(
        "training (--train)", "memory and time of one optimizer step per training recipe, with and without activation "
        "checkpointing (src/visor/training/bench.py); the options above about inference do not apply")
    training.add_argument("--train", action="store_true",
                          help="measure training steps instead of prefill and decoding: train.json, train.png")
    training.add_argument("--recipes", type=comma_separated(str, "recipe names"), default=None,
                          help="recipes to measure (default full,visor-stage1,visor-universal)")
    training.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                          help="rows whose extrapolated peak memory is above this are not run (default: the memory "
                               "available when the bench starts)")
    command(parser, _command, output="folder")


# What only inference benches use: (flag, whether the command line set it).
def _inference_options(args: argparse.Namespace) -> dict[str, bool]:
    return {"--repeats": args.repeats != BenchPlan.repeats, "--decode-tokens": args.decode_tokens != BenchPlan.decode_tokens,
            "--configurations": args.configurations is not None, "--device": args.device is not None,
            "--dtype": args.dtype != BenchPlan.dtype, "--baselines": bool(args.baselines),
            "--cross-attention-heads": args.cross_attention_heads is not None, "--batch-sizes": bool(args.batch_sizes),
            "--batched-prefill": args.batched_prefill, "--end-to-end": args.end_to_end,
            "--kv-budget": args.kv_budget is not None, "--engine": args.engine != "transformers",
            "--video-frames": bool(args.video_frames)}


def _command(args: argparse.Namespace) -> int:
    if args.train:
        return _train_command(args)
    for flag, given in {"--recipes": args.recipes is not None, "--memory-limit": args.memory_limit is not None}.items():
        if given:
            raise ValueError(f"{flag} belongs to --train")
    plan = BenchPlan(
        preset=args.preset, visual_tokens=args.visual_tokens, video_frames=args.video_frames, text_tokens=args.text_tokens,
        repeats=args.repeats, decode_tokens=args.decode_tokens, configurations=args.configurations,
        device=args.device or default_device(), dtype=args.dtype, baselines=args.baselines,
        cross_attention_key_value_heads=args.cross_attention_heads, batch_sizes=args.batch_sizes,
        batched_prefill=args.batched_prefill, kv_budget_gib=args.kv_budget, end_to_end=args.end_to_end,
    )
    if args.engine == "vllm":
        from visor.integrations.vllm.bench import engine_table, run_engine_bench, write_engine_outputs

        rows = run_engine_bench(plan)
        paths = write_engine_outputs(rows, args.output)
        print(engine_table(rows))
    else:
        rows = run_bench(plan)
        paths = write_outputs(rows, args.output)
        print(_table(rows))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def _train_command(args: argparse.Namespace) -> int:
    from visor.training.bench import TrainBenchPlan, run_train_bench, train_table, write_train_outputs

    refused = [flag for flag, given in _inference_options(args).items() if given]
    if refused:
        raise ValueError(f"--train measures training steps; {', '.join(refused)} belong to the inference bench")
    plan = TrainBenchPlan(preset=args.preset, visual_tokens=args.visual_tokens or TrainBenchPlan.visual_tokens,
                          text_tokens=args.text_tokens, recipes=tuple(args.recipes or TrainBenchPlan.recipes),
                          memory_limit_gib=args.memory_limit)
    limit = plan.memory_limit_bytes()
    rows = run_train_bench(plan, limit)
    paths = write_train_outputs(rows, plan, limit, args.output)
    print(train_table(rows))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def _table(rows: list[BenchRow]) -> str:
    budget = rows[0].requests_in_budget is not None
    video = rows[0].video_frames is not None
    head = f"{'method':<22}" + (f"{'frames':>7}" if video else "") + f"{'Nv':>6}"

    def key(row: BenchRow) -> str:  # which row: its label, its video's frames, its visual tokens
        return f"{_label(row):<22}" + (f"{row.video_frames:>7}" if video else "") + f"{row.visual_tokens:>6}"

    lines = [f"{head}{'GFLOPs':>10}{'ratio':>7}{'prefill s':>11}{'speed-up':>10}"
             f"{'decode ms':>11}{'KV vis MB':>11}{'KV text MB':>12}" + (f"{'in budget':>11}" if budget else "")]
    for row in rows:
        lines.append(
            f"{key(row)}{row.llm_prefill_flops / 1e9:>10.4g}{row.flops_ratio:>7.2f}"
            f"{row.prefill_s:>11.3g}{row.speedup:>10.2f}{row.decode_s_per_token * 1e3:>11.3g}"
            f"{row.kv_bytes_visual / 2**20:>11.3g}{row.kv_bytes_text / 2**20:>12.3g}"
            + (f"{row.requests_in_budget:>11}" if budget else "")
        )
    if rows[0].batched:
        lines += ["", f"{head}{'batch':>6}{'prefill s':>11}{'step ms':>10}{'tokens/s':>10}"
                      f"{'speed-up':>10}{'bytes ratio':>13}{'KV MB':>10}{'peak MB':>9}"]
        for row in rows:
            for batch in row.batched:
                prefill = "-" if batch.prefill_s is None else f"{batch.prefill_s:.3g}"
                peak = "-" if batch.peak_memory_bytes is None else f"{batch.peak_memory_bytes / 2**20:.0f}"
                lines.append(
                    f"{key(row)}{batch.batch_size:>6}{prefill:>11}"
                    f"{batch.decode_s_per_step * 1e3:>10.4g}{batch.decode_tokens_per_s:>10.4g}"
                    f"{batch.decode_speedup:>10.2f}{batch.bytes_read_ratio:>13.2f}{batch.kv_bytes / 2**20:>10.1f}{peak:>9}")
    if rows[0].vision_s is not None:
        lines += ["", f"{head}{'vision s':>10}{'LLM s':>9}{'TTFT s':>9}{'speed-up':>10}"
                      f"{'vision share':>14}{'FLOPs ratio':>13}"]
        for row in rows:
            if row.vision_s is None:
                continue
            full = next(other for other in rows if other.method == "full" and other.visual_tokens == row.visual_tokens)
            flops_ratio = (full.llm_prefill_flops + full.vision_flops) / (row.llm_prefill_flops + row.vision_flops)
            lines.append(
                f"{key(row)}{row.vision_s:>10.3g}{row.prefill_s:>9.3g}"
                f"{row.time_to_first_token_s:>9.3g}{row.time_to_first_token_speedup:>10.2f}"
                f"{row.vision_s / row.time_to_first_token_s:>14.0%}{flops_ratio:>13.2f}")
    return "\n".join(lines)
