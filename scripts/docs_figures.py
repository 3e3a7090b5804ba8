"""The tables the docs quote, rendered from the committed result files.

    .venv/bin/python scripts/docs_figures.py          # rewrite every generated block in place
    .venv/bin/python scripts/docs_figures.py --check  # change nothing; list stale blocks and typed figures (exit 1)

A generated block in README.md, docs/*.md or benchmarks/README.md reads

    <!-- results: RENDERER FILE [ARGUMENT] -->
    ...what RENDERER writes from FILE (a path from the repository root)...
    <!-- /results -->

and nothing between its markers is typed by hand: a later run that replaces FILE changes the block the next time
this script runs, and tests/test_docs_figures.py fails until it has. Renderers (`RENDERERS`):

- `prefill FILE VISUAL`: `visor bench` rows at VISUAL visual tokens (or, in a `--video-frames` run, `frames=N`: the
  rows whose video has N frames; so for every renderer of `visor bench` rows): FLOPs ratio, measured prefill
  speed-up, visual KV cache against the full model's, the text-only floor;
- `batched FILE VISUAL`: `visor bench --batch-sizes ... --end-to-end` rows: time to first token with the vision
  tower, decode speed-up against the full model at every batch size, requests in the KV budget;
- `decode FILE VISUAL`: the same file's decode tokens/s at every batch size, speed-up and bytes-read ratio against
  the full model, peak memory;
- `first-token FILE VISUAL`: `visor bench --end-to-end` rows: the vision tower's time, the LLM prefill's, time to
  first token and its speed-up, the vision tower's share of it;
- `baselines FILE [BATCH]`: `visor bench --baselines ...` rows: each method's prefill speed-up against its FLOPs
  ratio, the visual tokens it hands the language model, decode at BATCH requests, visual KV cache;
- `train FILE VISUAL`: `visor bench --train` rows at VISUAL visual tokens: peak memory and step time per recipe,
  with and without activation checkpointing;
- `convert FILE`: scripts/convert_memory.py's peak memory of each conversion;
- `engine FILE`: `visor bench --engine vllm` rows: time to first token, KV pool per request, requests in the KV
  budget, decode tokens/s and speed-up against the stock model served natively at every concurrency;
- `decode-bound FILE PRESET DTYPE`: those rows' decode speed-ups beside the bound that the bytes a step reads set
  (weights counted on the preset's models);
- `demo FILE`: a `visor demo` run's results.json by task group (accuracy, savings);
- `accuracy FILE SETTINGS METHODS`: that file's hard / easy accuracy of some methods at some target ratios;
- `router-curves FILE`: that run's router at every τ against the fixed curve (its report's lines);
- `trained FILE`: that run's trained baselines (its report's Table 6);
- `stages FILE`: the seconds each stage of that run took, as it recorded them;
- `seeds FILE [FILE ...]`: demo runs of one suite at several seeds, the router against the fixed curve in each;
- `ca-positions FILE`: scripts/qwen_ca_positions.sh's test accuracy per variant and configuration.

A number in a sentence is a generated value, rendered in place the same way:

    <!-- value: FILE EXPRESSION | FORMAT -->28.1x<!-- /value -->

EXPRESSION is arithmetic (` + `, ` - `, ` * `, ` / `, `( ... )`, spaces around each) of numbers and paths into
FILE's JSON (keys and list indices joined by dots; `[key=value;...]` picks the one row of a list whose fields
have those values); FORMAT is a Python format string (`{:.1f}x`, `{:.0f} min`). Outside generated blocks and values a document
carries no measured figure (a decimal number, a percentage, a duration, a number of points): `untraced_figures`
finds those, and tests/test_docs_figures.py holds every document to none.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from visor.files import write_text

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/*.md", "benchmarks/README.md")
BLOCK = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)
VALUE = re.compile(r"(<!-- value: (?P<spec>[^>]*?) -->)(?P<body>[^<]*)(<!-- /value -->)")
OPERATORS = {"/": lambda a, b: a / b, "*": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}


def _load(root: Path, path: str):
    """The JSON value of a committed result file."""
    return json.loads((root / path).read_text())


def _number(value: float) -> str:
    """Three significant figures, thousands separated (1,023; 28.1; 0.425)."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _configuration_label(row: dict) -> str:
    layers = len(row["self_attention_layers"])
    return "CA only" if layers == 0 else f"{layers} SA layer{'s' if layers > 1 else ''}"


def _method_label(row: dict) -> str:
    """The full model, a VISOR configuration, or a baseline at its setting (`fastv 4x`)."""
    if row["method"] == "full":
        return "full model"
    if row["method"] == "visor":
        return f"VISOR {_configuration_label(row)}"
    return f"{row['method']} {row['setting']}" if row.get("setting") else row["method"]


def _sweep_rows(root: Path, path: str, sweep: str) -> list[dict]:
    """`visor bench`'s rows in `path` at SWEEP: a visual-token count, or `frames=N` (a video of N frames)."""
    key, value = ("video_frames", sweep.removeprefix("frames=")) if sweep.startswith("frames=") else ("visual_tokens", sweep)
    rows = [row for row in _load(root, path) if row.get(key) == int(value)]
    if not rows:
        raise ValueError(f"{path} has no row at {value} {'frames' if key == 'video_frames' else 'visual tokens'}")
    return rows


def _bench_rows(root: Path, path: str, visual: str) -> list[dict]:
    """`visor bench`'s rows in `path` at `visual` (see `_sweep_rows`), the text-only floor left out."""
    return [row for row in _sweep_rows(root, path, visual) if row["method"] != "text-only"]


def render_prefill(root: Path, path: str, visual: str) -> str:
    """`visor bench` rows at VISUAL visual tokens: FLOPs ratio, measured prefill speed-up (and how much of the FLOPs
    ratio it is), visual KV cache against the full model's; the text-only floor last, where the file has it."""
    swept = _sweep_rows(root, path, visual)
    rows = [row for row in swept if row["method"] != "text-only"]
    floor = [row for row in swept if row["method"] == "text-only"]
    full = next(row for row in rows if row["method"] == "full")
    lines = ["| configuration | FLOPs ratio | measured prefill speed-up | speed-up / FLOPs ratio | visual KV cache |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row["method"] == "visor":
            smaller = full["kv_bytes_visual"] / row["kv_bytes_visual"]
            lines.append(f"| {_configuration_label(row)} (configuration {row['configuration']}) | "
                         f"{_number(row['flops_ratio'])}x | {_number(row['speedup'])}x | "
                         f"{row['speedup'] / row['flops_ratio']:.0%} | {smaller:.1f}x smaller |")
    lines.append(f"| full model | 1 | 1 ({_number(full['prefill_s'])} s) | | "
                 f"{_number(full['kv_bytes_visual'] / 2**20)} MiB |")
    for row in floor:
        lines.append(f"| text-only floor | {_number(row['flops_ratio'])}x | {_number(row['speedup'])}x "
                     f"({_number(row['prefill_s'])} s) | {row['speedup'] / row['flops_ratio']:.0%} | 0 |")
    return "\n".join(lines) + "\n"


def render_batched(root: Path, path: str, visual: str) -> str:
    """`visor bench --batch-sizes ... --end-to-end --kv-budget ...` rows at VISUAL visual tokens: time to first
    token with the vision tower, decode speed-up against the full model at every batch size, requests in the
    budget."""
    rows = _bench_rows(root, path, visual)
    sizes = " / ".join(str(batch["batch_size"]) for batch in rows[0]["batched"])
    lines = [f"| configuration | time to first token, vision tower included (speed-up) | decode speed-up at {sizes} "
             "requests | requests in the KV budget |", "|---|---|---|---|"]
    for row in rows:
        label = "full model" if row["method"] == "full" else _configuration_label(row)
        ttft = f"{_number(row['time_to_first_token_s'])} s ({row['time_to_first_token_speedup']:.2f}x)"
        speedups = " / ".join(f"{batch['decode_speedup']:.2f}" for batch in row["batched"])
        lines.append(f"| {label} | {ttft} | {speedups} | {row['requests_in_budget']:,} |")
    tower = rows[0]["vision_s"]
    return "\n".join(lines) + f"\n\nThe vision tower alone: {_number(tower)} s of every row's time to first token.\n"


def render_decode(root: Path, path: str, visual: str) -> str:
    """`visor bench --batch-sizes ...` decoding at VISUAL visual tokens: tokens/s at every batch size (in brackets
    the speed-up over the full model and, from 16 requests on, full / this row's bytes read per step), the text-only
    floor included, and the peak memory at the largest batch."""
    rows = _sweep_rows(root, path, visual)
    sizes = [batch["batch_size"] for batch in rows[0]["batched"]]
    lines = ["| configuration | " + " | ".join(f"B = {size}" for size in sizes) + f" | peak memory at B = {sizes[-1]} |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for row in rows:
        label = {"full": "full model", "text-only": "text-only floor"}.get(row["method"]) or _configuration_label(row)
        cells = []
        for batch in row["batched"]:
            cell = _number(batch["decode_tokens_per_s"])
            if row["method"] == "visor":
                bytes_ratio = f" / {batch['bytes_read_ratio']:.2f}" if batch["batch_size"] >= 16 else ""
                cell += f" ({batch['decode_speedup']:.2f}x{bytes_ratio})"
            cells.append(cell)
        peak = row["batched"][-1]["peak_memory_bytes"] / 2**30
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_number(peak)} GiB |")
    return "\n".join(lines) + "\n"


def render_first_token(root: Path, path: str, visual: str) -> str:
    """`visor bench --end-to-end` rows at VISUAL: the vision tower's seconds (the same in every row but a video
    reduction's, timed on its own path), the LLM
    prefill's, time to first token with its speed-up over the full model, and the vision tower's share of it."""
    lines = ["| configuration | vision tower | LLM prefill | time to first token (speed-up) | vision tower's share |",
             "|---|---|---|---|---|"]
    for row in _bench_rows(root, path, visual):
        lines.append(f"| {_method_label(row)} | {_number(row['vision_s'])} s | {_number(row['prefill_s'])} s | "
                     f"{_number(row['time_to_first_token_s'])} s ({row['time_to_first_token_speedup']:.2f}x) | "
                     f"{row['vision_s'] / row['time_to_first_token_s']:.0%} |")
    return "\n".join(lines) + "\n"


def render_decode_bound(root: Path, path: str, preset: str, dtype: str) -> str:
    """`visor bench --engine vllm` decoding against its byte bound: a step reads the weights once (counted by
    `visor.bench.decode_weight_bytes` on the preset's models, built on the meta device in DTYPE) plus every request's
    keys and values (the file's KV pool per request), so if time followed bytes alone a row would decode
    (native bytes / its bytes) times as fast as the stock model; the measured speed-up beside that bound."""
    import torch

    from visor.bench import decode_weight_bytes
    from visor.benchmarking import DTYPES
    from visor.backbones import family
    from visor.presets import preset_config

    stock = preset_config(preset)
    model_class = family(stock).VISOR_MODEL
    with torch.device("meta"):
        weights = {dense: decode_weight_bytes(model_class._from_config(config, dtype=DTYPES[dtype])) for dense, config in
                   ((True, model_class.config_class.dense(stock, position_encoding=False)),
                    (False, model_class.config_class.from_stock_config(stock)))}
    rows = _load(root, path)
    native = next(row for row in rows if row["method"] == "native")
    counts = [item["requests"] for item in native["concurrent"]]
    at = " / ".join(map(str, counts))
    lines = [f"| row | weights read per step | KV per request | byte bound at {at} requests | measured | "
             "KV-only ceiling |", "|---|---|---|---|---|---|"]
    for row in rows:
        read = weights[row["method"] != "visor"]
        bounds = [(weights[True] + count * native["kv_reserved_bytes"]) / (read + count * row["kv_reserved_bytes"])
                  for count in counts]
        label = {"native": "stock (vLLM's own)", "full": "full (plugin)"}.get(row["method"]) or (
            f"VISOR {row['configuration']}: {_configuration_label(row)}")
        measured = " / ".join(f"{item['decode_speedup']:.2f}" for item in row["concurrent"])
        lines.append(f"| {label} | {read / 1e9:.2f} GB | {_number(row['kv_reserved_bytes'] / 1e6)} MB | "
                     + " / ".join(f"{bound:.2f}" for bound in bounds) + f" | {measured} | "
                     f"{native['kv_reserved_bytes'] / row['kv_reserved_bytes']:.2f}x |")
    return "\n".join(lines) + "\n"


def render_baselines(root: Path, path: str, batch: str | None = None) -> str:
    """`visor bench --baselines RATIOS` rows: each method's FLOPs ratio, measured prefill speed-up (and how much of
    its FLOPs ratio that is), the visual tokens it hands the language model, with BATCH decode tokens/s at BATCH
    requests against the full model, visual KV cache (the text-only floor left out)."""
    rows = [row for row in _load(root, path) if row["method"] != "text-only"]
    decode_column = "" if batch is None else f" decode tokens/s at B = {batch} (speed-up) |"
    lines = [f"| method | FLOPs ratio | measured prefill speed-up | of its FLOPs ratio | visual tokens entering the LLM |"
             f"{decode_column} visual KV cache |", "|---|---|---|---|---|---|" + ("---|" if batch else "")]
    for row in rows:
        speedup = (f"1 ({_number(row['prefill_s'])} s) |" if row["method"] == "full"
                   else f"{_number(row['speedup'])}x | {row['speedup'] / row['flops_ratio']:.0%}")
        decode = ""
        if batch is not None:
            batched = next(item for item in row["batched"] if item["batch_size"] == int(batch))
            decode = f" {_number(batched['decode_tokens_per_s'])} ({batched['decode_speedup']:.2f}x) |"
        lines.append(f"| {_method_label(row)} | {_number(row['flops_ratio'])}x | {speedup} | "
                     f"{row['llm_visual_tokens'] or row['visual_tokens']:,} |{decode} "
                     f"{_number(row['kv_bytes_visual'] / 2**20)} MiB |")
    return "\n".join(lines) + "\n"


def render_train(root: Path, path: str, visual: str) -> str:
    """`visor bench --train` at VISUAL visual tokens: each recipe's trainable parameters, peak memory and step time
    without and with activation checkpointing (a peak predicted above the memory limit says so, with the largest
    image measured)."""
    rows = _load(root, path)["rows"]
    at = {(row["recipe"], row["activation_checkpointing"], row["visual_tokens"]): row for row in rows}

    def cell(recipe: str, checkpointing: bool) -> str:
        row = at[recipe, checkpointing, int(visual)]
        if row["outcome"] == "measured":
            return f"{_number(row['peak_memory_bytes'] / 2**30)} GiB / {_number(row['step_s'])} s"
        measured = max((other for other in rows if other["recipe"] == recipe and other["outcome"] == "measured"
                        and other["activation_checkpointing"] == checkpointing), key=lambda other: other["visual_tokens"])
        return (f"{_number(row['predicted_peak_bytes'] / 2**30)} GiB predicted (not run; "
                f"{_number(measured['peak_memory_bytes'] / 2**30)} GiB at {measured['visual_tokens']:,} tokens)")

    lines = ["| recipe | trainable | activation checkpointing off: peak / step | on: peak / step |", "|---|---|---|---|"]
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        trainable = next(row["trainable_parameters"] for row in rows if row["recipe"] == recipe and row["trainable_parameters"])
        lines.append(f"| {recipe} | {_number(trainable / 1e6)} M | {cell(recipe, False)} | {cell(recipe, True)} |")
    return "\n".join(lines) + "\n"


def render_convert(root: Path, path: str) -> str:
    """scripts/convert_memory.py's rows: each conversion's peak memory against the checkpoint's size on disk."""
    results = _load(root, path)
    lines = ["| conversion | peak memory | / size on disk | above the import baseline / size | time |",
             "|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['conversion']} | {_number(row['peak_bytes'] / 2**30)} GiB | {row['peak_over_size']:.2f}x | "
                     f"{row['above_baseline_over_size']:.2f}x | {row['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def render_ca_positions(root: Path, path: str) -> str:
    """scripts/qwen_ca_positions.sh's test accuracy: the full model, then every configuration of each variant."""
    results = _load(root, path)
    tasks = [task for task in results["full"] if task != "mean"]
    lines = ["| model | configuration | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]

    def cells(accuracy: dict) -> str:
        return " | ".join(f"{accuracy[task]:.1f}" for task in [*tasks, "mean"])

    lines.append(f"| full | | {cells(results['full'])} |")
    for variant in results["variants"]:
        for index, configuration in enumerate(variant["configurations"]):
            layers = configuration["self_attention_layers"]
            label = f"SA {layers}" if layers else "CA only"
            lines.append(f"| {variant['label'] if index == 0 else ''} | {label} | {cells(configuration['accuracy'])} |")
    return "\n".join(lines) + "\n"


def render_engine(root: Path, path: str) -> str:
    rows = _load(root, path)
    counts = [item["requests"] for item in rows[0]["concurrent"]]
    at = " / ".join(str(count) for count in counts)
    lines = [f"| row | TTFT (speed-up) | KV per request (x less) | requests in the budget | decode tokens/s at {at} "
             f"requests | speed-up at {at} |", "|---|---|---|---|---|---|"]
    for row in rows:
        label = {"native": "stock (vLLM's own)", "full": "full (plugin)"}.get(row["method"])
        label = label or f"VISOR {row['configuration']}: {_configuration_label(row)}"
        ttft = f"{_number(row['time_to_first_token_s'])} s"
        kv = f"{_number(row['kv_reserved_bytes'] / 2**20)} MiB"
        if row["method"] != "native":
            ttft += f" ({_number(row['time_to_first_token_speedup'])}x)"
            kv += f" ({row['kv_ratio']:.2f}x)"
        rates = " / ".join(_number(item["decode_tokens_per_s"]) for item in row["concurrent"])
        speedups = " / ".join(f"{item['decode_speedup']:.2f}" for item in row["concurrent"])
        budget = "-" if row["requests_in_budget"] is None else f"{row['requests_in_budget']:,}"
        lines.append(f"| {label} | {ttft} | {kv} | {budget} | {rates} | {speedups} |")
    return "\n".join(lines) + "\n"


def render_demo(root: Path, path: str) -> str:
    """The demo's systems by task group: the full model, text-only, every VISOR row and the policy, and each
    baseline at its weakest setting and its strongest (with the savings it reaches: some cannot reach their
    target)."""
    results = _load(root, path)
    groups = sorted({row["group"] for row in results["groups"]}, reverse=True)  # hard, then easy
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for row in results["groups"]:
        by_key.setdefault((row["method"], row["setting"]), {})[row["group"]] = row
    first = ("full", "text-only", "visor", "visor-policy")
    ordered = sorted(by_key, key=lambda key: (first.index(key[0]) if key[0] in first else len(first), key[0]))
    lines = ["| method | setting | " + " | ".join(f"{group} acc % | {group} savings" for group in groups) + " |",
             "|---|---|" + "---|---|" * len(groups)]
    for method in dict.fromkeys(key[0] for key in ordered):
        settings = [key for key in ordered if key[0] == method]
        if method not in first:  # a baseline: its weakest and its strongest setting
            settings = list(dict.fromkeys([settings[0], max(settings, key=lambda key: by_key[key][groups[0]]["savings"])]))
        for key in settings:
            rows = by_key[key]
            label, reached = key[1], rows[groups[0]]["savings"]
            if method == "visor-policy":
                label += f" (τ = {results['stages']['policy']['threshold']:g})"
            elif label == "SA []":
                label += " (CA only)"
            elif method not in first and label.endswith("x") and abs(reached / float(label[:-1]) - 1) > 0.1:
                label += f" (reaches {reached:.1f}x)"
            name = f"**{method}**" if method.startswith("visor") else method
            cells = " | ".join(f"{rows[group]['accuracy']:.1f} | {rows[group]['savings']:.2f}x" for group in groups)
            lines.append(f"| {name} | {label} | {cells} |")
    return "\n".join(lines) + "\n"


def render_accuracy(root: Path, path: str, settings: str, methods: str) -> str:
    """A demo run's hard / easy accuracy of each of METHODS (comma-separated) at each of SETTINGS (its target
    ratios, comma-separated), with the savings reached where a method falls short of its target by more than 10%."""
    rows = {(row["method"], row["setting"], row["group"]): row for row in _load(root, path)["groups"]}
    settings = settings.split(",")
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for method in methods.split(","):
        cells = []
        for setting in settings:
            hard, easy = rows[method, setting, "hard"], rows[method, setting, "easy"]
            cell = f"{hard['accuracy']:.1f} / {easy['accuracy']:.1f}"
            if abs(hard["savings"] / float(setting.rstrip("x")) - 1) > 0.1:
                cell += f" (reaches {hard['savings']:.1f}x)"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_router_curves(root: Path, path: str) -> str:
    """A demo run's router at every τ of its sweep against the fixed curve, per split and task group: the lines its
    report.md gives (`visor.demo.report.router_curve_verdicts`)."""
    from visor.demo.report import router_curve_verdicts

    policy = _load(root, path)["stages"]["policy"]
    lines = [line for split, title in (("test", "test split"), ("variants", "held-out task variants"))
             for line in router_curve_verdicts(policy[split], policy[f"{split}_curves"], title)]
    return "".join(f"- {line}\n" for line in lines)


def render_trained(root: Path, path: str) -> str:
    """A demo run's trained baselines next to the full model and the policy: its report's Table 6
    (`visor.demo.report.trained_table`)."""
    from visor.demo.report import trained_table

    return "".join(f"{line}\n" for line in trained_table(_load(root, path)) if line.startswith("|"))


SEED_CELLS = (("test", "hard"), ("test", "easy"), ("variants", "hard"), ("variants", "easy"),
              ("budget_test", "hard"), ("budget_variants", "hard"))


def _signed(value: float) -> str:
    """One decimal with its sign; a value that rounds to zero is +0.0, never -0.0."""
    return f"{round(value, 1) + 0.0:+.1f}"


def _router_row(rows: list[dict], group: str) -> dict:
    return next(row for row in rows if row["method"] == "router" and row["subset"] == f"group:{group}")


def render_seeds(root: Path, *paths: str) -> str:
    """Demo runs of one suite at several seeds: the router's gap to the fixed curve in answers (± its 95% noise)
    at the calibrated τ and at the budget τ per split and task group, then what the seeds have in common: how
    often the router is at or above the curve and beyond the noise, how far the fixed configurations differ on
    easy tasks, and the FLOPs the router spends beyond the cheapest configuration per group."""
    from visor.demo.report import ROUNDING

    lines = ["| seed (file) | τ | hard test | easy test | hard variants | easy variants | hard test, budget | "
             "hard variants, budget |", "|---|---|---|---|---|---|---|---|"]
    gaps = {"hard": [], "easy": []}
    spreads, extra = [], {"hard": [], "easy": []}
    for path in paths:
        run = _load(root, path)
        policy = run["stages"]["policy"]
        cells = []
        for split, group in SEED_CELLS:
            router = _router_row(policy[split], group)
            cells.append(f"{_signed(router['curve_gap'])} ± {router['curve_gap_noise']:.1f}")
            gaps[group].append((router["curve_gap"], router["curve_gap_noise"], router["samples"]))
        for split in ("test", "variants"):
            for group in extra:
                fixed = [row for row in policy[split]
                         if row["subset"] == f"group:{group}" and row["method"].startswith("fixed-")]
                extra[group].append(_router_row(policy[split], group)["mean_llm_prefill_flops"]
                                    - min(row["mean_llm_prefill_flops"] for row in fixed))
                if group == "easy":
                    spreads.append(max(row["accuracy"] for row in fixed) - min(row["accuracy"] for row in fixed))
        lines.append(f"| {run['plan']['seed']} (`{path}`) | {policy['threshold']:.3g} | " + " | ".join(cells) + " |")

    def beyond(cases):
        return sum(abs(gap) > noise + ROUNDING for gap, noise, _ in cases)

    hard, easy = gaps["hard"], gaps["easy"]
    lines += [
        "",
        f"- Hard tasks: the router at or above the fixed curve in {sum(gap >= -ROUNDING for gap, _, _ in hard)} of "
        f"{len(hard)} cases (seed × split × τ), beyond the noise in {beyond(hard)}.",
        f"- Easy tasks: the fixed configurations within {max(spreads):.1f} points of each other (the largest spread "
        f"of any seed and split); the router's gap from {_signed(min(gap for gap, _, _ in easy))} to "
        f"{_signed(max(gap for gap, _, _ in easy))} of {easy[0][2]} answers, beyond the noise in {beyond(easy)} of "
        f"{len(easy)}.",
        f"- FLOPs the router spends beyond the cheapest configuration (test and variants, every seed): easy "
        f"{min(extra['easy']) / 1e9:.4f}-{max(extra['easy']) / 1e9:.4f} GFLOPs, hard {min(extra['hard']) / 1e9:.3f}-"
        f"{max(extra['hard']) / 1e9:.3f}; less on easy than on hard in "
        f"{sum(e < h for e, h in zip(extra['easy'], extra['hard']))} of {len(extra['easy'])} runs × splits.",
    ]
    return "".join(f"{line}\n" for line in lines)


def render_stages(root: Path, path: str) -> str:
    """How long a run's stages took, as its results file recorded them."""
    stages = _load(root, path)["stages"]
    timed = [(name, stage["seconds"]) for name, stage in stages.items()
             if isinstance(stage, dict) and stage.get("seconds")]
    timed += [(f"added ({', '.join(stage['methods'])})", stage["seconds"]) for stage in stages.get("added", [])]
    total = sum(seconds for _, seconds in timed)
    return (f"- `{path}`: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timed)
            + f"; {total / 60:.1f} min in all.\n")


RENDERERS: dict[str, Callable[..., str]] = {
    "prefill": render_prefill, "batched": render_batched, "decode": render_decode, "first-token": render_first_token,
    "train": render_train,
    "baselines": render_baselines, "convert": render_convert,
    "engine": render_engine, "decode-bound": render_decode_bound,
    "demo": render_demo, "accuracy": render_accuracy, "router-curves": render_router_curves,
    "trained": render_trained, "stages": render_stages, "seeds": render_seeds, "ca-positions": render_ca_positions,
}


def _lookup(data, path: str, where: str):
    """The value at `path` in `data`: keys and list indices joined by dots, `[key=value;...]` for the one row of a
    list with those fields (values compared as text)."""
    for part in re.findall(r"\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]|[^.\[]+", path):
        if part.startswith("["):
            wanted = dict(item.split("=", 1) for item in part[1:-1].split(";"))
            rows = [row for row in data if all(str(row.get(key)) == value for key, value in wanted.items())]
            if len(rows) != 1:
                raise ValueError(f"{where}: {len(rows)} rows match {part} (one wanted)")
            data = rows[0]
        elif isinstance(data, list):
            if not part.isdigit() or int(part) >= len(data):
                raise ValueError(f"{where}: {part!r} in {path} is no index of a list of {len(data)}")
            data = data[int(part)]
        elif part in data:
            data = data[part]
        else:
            raise ValueError(f"{where}: no {part!r} in {path} (keys: {', '.join(map(str, data))})")
    return data


def render_value(root: Path, spec: str, where: str = "", load: Callable[[Path, str], object] = _load) -> str:
    """One `<!-- value: FILE EXPRESSION | FORMAT -->`: an arithmetic expression of FILE's values, formatted
    (`load` reads FILE: `render` reads each file once for all of a document's values)."""
    expression, _, form = spec.partition(" | ")
    path, expression = expression.split(" ", 1)
    data = load(root, path)
    tokens = [token.strip() for token in re.split(r"(?:^|\s)([-+*/()])(?=\s|$)", expression) if token.strip()]

    def atom() -> float:
        token = tokens.pop(0)
        if token == "(":
            value = total()
            tokens.pop(0)  # ")"
            return value
        return float(token) if re.fullmatch(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", token) else _lookup(data, token, f"{where} {path}")

    def product() -> float:
        value = atom()
        while tokens and tokens[0] in "*/":
            value = OPERATORS[tokens.pop(0)](value, atom())
        return value

    def total() -> float:
        value = product()
        while tokens and tokens[0] in "+-":
            value = OPERATORS[tokens.pop(0)](value, product())
        return value

    value = total()
    return form.format(value) if form else _number(value)


FIGURE = re.compile(r"(?<![\w.\-/+])(?:\d[\d,]*\.\d+x?|\d[\d,]*(?:\.\d+)?\s?(?:%|min\b|minutes?\b|s\b|seconds?\b"
                    r"|ms\b|hours?\b|h\b|points?\b))(?![\w.\-/])")
VERSION = re.compile(r"(?:Python|vLLM|transformers|torch|lmms-eval|accelerate|version)\s+(?:[<>=]=?\s*)?$")


def untraced_figures(text: str) -> list[str]:
    """The measured-looking figures of a document that no generated block or value wrote: decimals, percentages,
    durations and points, outside code (versions after a package's name are not figures)."""
    text = VALUE.sub("", BLOCK.sub("", text))
    text = re.sub(r"```.*?```|`[^`\n]*`|<!--.*?-->", "", text, flags=re.DOTALL)
    return [match[0] for match in FIGURE.finditer(text) if not VERSION.search(text[max(0, match.start() - 20):match.start()])]


def result_files(text: str) -> set[str]:
    """The result files a document's generated blocks and values read."""
    files = {match["spec"].split()[0] for match in VALUE.finditer(text)}
    for match in BLOCK.finditer(text):
        first, *arguments = match["spec"].split()[1:]  # FILE, then the renderer's arguments (more files for `seeds`)
        files |= {first, *(argument for argument in arguments if argument.endswith(".json"))}
    return files


def documents(root: Path) -> list[Path]:
    return sorted({path for pattern in DOCUMENTS for path in root.glob(pattern)})


def render(text: str, root: Path, where: str = "") -> str:
    """`text` with every generated block rewritten from its file."""

    def block(match: re.Match) -> str:
        name, *arguments = match["spec"].split()
        if name not in RENDERERS:
            raise ValueError(f"{where}: unknown renderer {name!r} (known: {', '.join(RENDERERS)})")
        return match.group(1) + RENDERERS[name](root, *arguments) + match.group(4)

    load = functools.cache(_load)

    def value(match: re.Match) -> str:
        return match.group(1) + render_value(root, match["spec"], where, load) + match.group(4)

    return VALUE.sub(value, BLOCK.sub(block, text))


def stale_documents(root: Path = ROOT) -> dict[str, str]:
    """The documents under `root` whose generated blocks differ from what their files give: name -> its text with
    every block rendered again."""
    stale = {}
    for path in documents(root):
        text = path.read_text()
        rendered = render(text, root, str(path))
        if rendered != text:
            stale[str(path.relative_to(root))] = rendered
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs or a document carries a figure no file wrote")
    args = parser.parse_args(argv)
    stale = stale_documents()
    if args.check:
        for name in stale:
            print(f"{name}: a generated block differs from its results (run scripts/docs_figures.py)")
        untraced = {str(path.relative_to(ROOT)): untraced_figures(path.read_text()) for path in documents(ROOT)}
        for name, figures in untraced.items():
            if figures:
                print(f"{name}: {len(figures)} figures no result file wrote: {' '.join(figures)}")
        return 1 if stale or any(untraced.values()) else 0
    for name, rendered in stale.items():
        write_text(ROOT / name, rendered)
        print(f"rewrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
