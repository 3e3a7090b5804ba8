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
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from tqdm import tqdm

from visor import reduction
from visor.backbones import backbone_for, family
from visor.cli import comma_separated, command
from visor.config import Schedule
from visor.device import check_device, default_device
from visor.files import save_figure, write_json
from visor.flops import (
    decode_flops_per_token,
    layerwise_decode_flops_per_token,
    llm_prefill_flops,
    nominal_vision_flops,
)
from visor.presets import PRESETS, preset_config
from visor.reduction.budget import solve_strength
from visor.reduction.pruned import PruningPlan, kept_count, pruned

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class BenchPlan:
    """What to measure; validated on creation, before any model is built."""

    preset: str
    visual_tokens: tuple[int, ...] = (729, 2916, 7290)
    text_tokens: int = 64
    repeats: int = 3
    decode_tokens: int = 8
    configurations: tuple[int, ...] | None = None  # VISOR configurations to run; None = all
    device: str = field(default_factory=default_device)
    dtype: str = "bfloat16"
    baselines: tuple[float, ...] = ()  # target FLOPs ratios of the token-reduction baselines; () = none
    cross_attention_key_value_heads: int | None = None  # CA blocks' K/V heads; None = the host layer's

    def __post_init__(self):
        config = self.config  # an unknown preset or a bad head count raises here
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
        check_device(self.device)

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
    vision_flops: int  # vision tower + projector on an image of visual_tokens tokens (the same for every method)
    flops_ratio: float | None = None  # full model's LLM prefill FLOPs / this row's
    speedup: float | None = None  # full model's measured prefill seconds / this row's
    setting: str | None = None  # a baseline's target FLOPs ratio, e.g. "4x"
    llm_visual_tokens: int | None = None  # visual tokens a pre-LLM baseline hands the language model


def run_bench(plan: BenchPlan) -> list[BenchRow]:
    """Measure every (method, configuration, visual tokens) row of `plan`; rows sorted by visual tokens."""
    config = plan.config
    dense = [("full", None, visual) for visual in plan.visual_tokens]
    dense += [("text-only", None, visual) for visual in plan.visual_tokens]
    sparse = [("visor", index, visual) for visual in plan.visual_tokens for index in plan.visor_configurations]
    methods = reduction.methods_for(config)
    baselines = [(method, ratio, visual) for visual in plan.visual_tokens for ratio in plan.baselines
                 for method in methods]
    on_visor = [spec for spec in baselines if spec[0].startswith("visor+")]
    on_full = [spec for spec in baselines if not spec[0].startswith("visor+")]
    rows = []
    with tqdm(total=len(dense) + len(sparse) + len(baselines), desc="visor bench", unit="row") as progress:
        for model_config, specs, reduced in ((plan.dense_config, dense, on_full), (config, sparse, on_visor)):
            progress.set_postfix_str(f"building {plan.preset} ({'full' if specs is dense else 'VISOR'})")
            model = _build(model_config, plan)
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
    order = {"full": 0, "visor": 1, **{method: 2 + i for i, method in enumerate(reduction.METHODS)}, "text-only": 99}
    rows.sort(key=lambda row: (row.visual_tokens, order[row.method], row.configuration or 0,
                               float((row.setting or "0x")[:-1])))
    for row in rows:
        full = next(other for other in rows if other.method == "full" and other.visual_tokens == row.visual_tokens)
        row.flops_ratio = full.llm_prefill_flops / row.llm_prefill_flops
        row.speedup = full.prefill_s / row.prefill_s
    return rows


def _build(config, plan: BenchPlan):
    torch.manual_seed(0)
    model = family(config).VISOR_MODEL._from_config(config, dtype=DTYPES[plan.dtype])
    return model.to(plan.device).eval()


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
    prefill_s, decode_s, kv_bytes = timings
    return BenchRow(method=method, visual_tokens=visual, text_tokens=plan.text_tokens, prefill_s=prefill_s,
                    decode_s_per_token=decode_s, kv_bytes_visual=kv_bytes["visual"], kv_bytes_text=kv_bytes["text"],
                    **_vision_cost(plan.config, visual), **measured)


def _vision_cost(config, visual: int) -> dict:
    """The vision side of a prompt with `visual` tokens: the same for every method (see the module notes)."""
    return dict(vision_flops=nominal_vision_flops(config, visual).total)


@torch.inference_mode()
def _measure_baseline(model, plan: BenchPlan, method: str, ratio: float, visual: int) -> BenchRow:
    """A token-reduction baseline at `ratio` on the prompt with `visual` visual tokens (see the module notes)."""
    config, text = plan.config, plan.text_tokens
    input_ids, text_ids, images = _prompt(model, plan, visual, seed=visual)
    counted = dict(input_ids=input_ids.cpu())
    setting = f"{ratio:g}x"
    if isinstance(reduction.reduction_at(config, method, 1.0), PruningPlan):  # in the LLM: its own layer loop
        pruning = reduction.reduction_for(config, method, ratio, inputs=counted)
        inputs = dict(input_ids=input_ids, **images, use_cache=True, logits_to_keep=1)
        timings = _timings(pruned(model, pruning), plan, inputs, text_ids)
        per_layer = pruning.visual_per_layer(config, counted)[0].tolist()
        return _row(plan, method, visual, timings, configuration=None, setting=setting,
                    llm_prefill_flops=int(pruning.prefill_flops(config, counted)[0]),
                    self_attention_layers=[layer for layer in range(config.num_layers) if layer not in pruning.frozen],
                    decode_flops_per_token=layerwise_decode_flops_per_token(
                        config, [text + v + 1 for v in per_layer]).total)
    on_visor = method.startswith("visor+")
    base, configuration = ("visor", config.largest_configuration) if on_visor else ("full", None)
    schedule = Schedule.of(config, configuration) if on_visor else Schedule.full(config)

    def cost(kept: float, inputs: dict) -> torch.Tensor:
        return torch.tensor([llm_prefill_flops(config, kept_count(visual, kept), text, schedule).total])

    kept = kept_count(visual, solve_strength(config, cost, ratio, inputs=counted))
    return replace(_measure(model, plan, base, configuration, kept), method=method, visual_tokens=visual,
                   setting=setting, llm_visual_tokens=kept, **_vision_cost(config, visual))


def _prompt(model, plan: BenchPlan, visual: int, seed: int):
    """(input_ids (1, N_v + N_t), text ids, the image's arguments: random features (N_v, d) and what positions need):
    the image, then the text."""
    config, device = plan.config, torch.device(plan.device)
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(0, config.text_config.vocab_size, (plan.text_tokens,), generator=generator)
    text_ids[text_ids == config.image_token_id] = 0
    input_ids = torch.cat([torch.full((visual,), config.image_token_id), text_ids])[None].to(device)
    if not visual:
        return input_ids, text_ids, {}
    features = torch.randn(visual, config.text_config.hidden_size, generator=generator).to(device, model.dtype)
    extra = {name: value.to(device) for name, value in backbone_for(config).nominal_image_inputs(visual).items()}
    return input_ids, text_ids, dict(image_features=[features], **extra)


def _timings(model, plan: BenchPlan, inputs: dict, text_ids: torch.Tensor):
    """(median prefill seconds, median decode seconds per token, KV bytes after prefill) of one prompt."""
    device = torch.device(plan.device)
    prefill_times = []
    for _ in range(plan.repeats + 1):  # the first run is the warm-up
        output = None  # free the previous run's cache first
        seconds, output = _timed(device, lambda: model(**inputs))
        prefill_times.append(seconds)
    cache = output.past_key_values
    kv_bytes = cache.nbytes()

    step = dict(input_ids=text_ids[:1][None].to(device), past_key_values=cache, use_cache=True)
    decode_times = [_timed(device, lambda: model(**step))[0] for _ in range(plan.decode_tokens + 1)]
    del cache, output
    gc.collect()
    return statistics.median(prefill_times[1:]), statistics.median(decode_times[1:]), kv_bytes


def _timed(device: torch.device, run):
    """(seconds, result) of `run()`, waiting for an accelerator to finish its queued work."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter() - start, result


# ---- outputs -----------------------------------------------------------------------------------------------------
def _label(row: BenchRow) -> str:
    if row.method == "visor":
        return f"VISOR {row.configuration} ({len(row.self_attention_layers)} SA)"
    if row.setting is not None:
        return f"{row.method} {row.setting}"
    return row.method


def write_outputs(rows: list[BenchRow], output: str | Path) -> list[Path]:
    """`bench.json`, `flops.png` and `speedup.png` in `output`; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "bench.json", output / "flops.png", output / "speedup.png"]
    write_json(paths[0], [asdict(row) for row in rows])

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
    axes.set(xlabel="visual tokens", ylabel="LLM prefill FLOPs", yscale="log",
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
    return paths


# ---- command line ---------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="FLOPs, prefill/decode time and KV bytes: full model vs VISOR configurations vs text-only "
             "(and token-reduction baselines)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", required=True, help="model shapes: one of " + ", ".join(PRESETS))
    parser.add_argument("--visual-tokens", type=comma_separated(), default=BenchPlan.visual_tokens,
                        help="comma-separated visual-token counts (default 729,2916,7290)")
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
    command(parser, _command, output="folder")


def _command(args: argparse.Namespace) -> int:
    plan = BenchPlan(
        preset=args.preset, visual_tokens=args.visual_tokens, text_tokens=args.text_tokens,
        repeats=args.repeats, decode_tokens=args.decode_tokens, configurations=args.configurations,
        device=args.device or default_device(), dtype=args.dtype, baselines=args.baselines,
        cross_attention_key_value_heads=args.cross_attention_heads,
    )
    rows = run_bench(plan)
    paths = write_outputs(rows, args.output)
    print(_table(rows))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def _table(rows: list[BenchRow]) -> str:
    lines = [f"{'method':<22}{'Nv':>6}{'GFLOPs':>10}{'ratio':>7}{'prefill s':>11}{'speed-up':>10}"
             f"{'decode ms':>11}{'KV vis MB':>11}{'KV text MB':>12}"]
    for row in rows:
        lines.append(
            f"{_label(row):<22}{row.visual_tokens:>6}{row.llm_prefill_flops / 1e9:>10.4g}{row.flops_ratio:>7.2f}"
            f"{row.prefill_s:>11.3g}{row.speedup:>10.2f}{row.decode_s_per_token * 1e3:>11.3g}"
            f"{row.kv_bytes_visual / 2**20:>11.3g}{row.kv_bytes_text / 2**20:>12.3g}"
        )
    return "\n".join(lines)
