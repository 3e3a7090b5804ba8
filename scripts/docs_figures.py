"""The tables the docs quote, rendered from the committed result files.

    .venv/bin/python scripts/docs_figures.py          # rewrite every generated block in place
    .venv/bin/python scripts/docs_figures.py --check  # change nothing; list the blocks that differ (exit 1)

A generated block in README.md, docs/*.md or benchmarks/README.md reads

    <!-- results: RENDERER FILE [ARGUMENT] -->
    ...what RENDERER writes from FILE (a path from the repository root)...
    <!-- /results -->

and nothing between its markers is typed by hand: a later run that replaces FILE changes the block the next time
this script runs, and tests/test_docs_figures.py fails until it has. Renderers (`RENDERERS`):

- `prefill FILE VISUAL`: `visor bench` rows at VISUAL visual tokens: FLOPs ratio, measured prefill speed-up,
  visual KV cache against the full model's;
- `batched FILE VISUAL`: `visor bench --batch-sizes ... --end-to-end` rows: time to first token with the vision
  tower, decode speed-up against the full model at every batch size, requests in the KV budget;
- `engine FILE`: `visor bench --engine vllm` rows: time to first token, KV pool per request, requests in the KV
  budget, decode tokens/s and speed-up against the stock model served natively at every concurrency;
- `demo FILE`: a `visor demo` run's results.json by task group (accuracy, savings);
- `stages FILE`: the seconds each stage of that run took, as it recorded them;
- `ca-positions FILE`: scripts/qwen_ca_positions.sh's test accuracy per variant and configuration.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from visor.files import write_text

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/*.md", "benchmarks/README.md")
BLOCK = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


def _number(value: float) -> str:
    """Three significant figures, thousands separated (1,023; 28.1; 0.425)."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _configuration_label(row: dict) -> str:
    layers = len(row["self_attention_layers"])
    return "CA only" if layers == 0 else f"{layers} SA layer{'s' if layers > 1 else ''}"


def _bench_rows(root: Path, path: str, visual: str) -> list[dict]:
    """`visor bench`'s rows in `path` at `visual` visual tokens (the text-only floor left out)."""
    rows = [row for row in json.loads((root / path).read_text())
            if row["visual_tokens"] == int(visual) and row["method"] != "text-only"]
    if not rows:
        raise ValueError(f"{path} has no row at {visual} visual tokens")
    return rows


def render_prefill(root: Path, path: str, visual: str) -> str:
    rows = _bench_rows(root, path, visual)
    full = next(row for row in rows if row["method"] == "full")
    lines = ["| configuration | FLOPs ratio | measured prefill speed-up | visual KV cache |", "|---|---|---|---|"]
    for row in rows:
        if row["method"] == "visor":
            smaller = full["kv_bytes_visual"] / row["kv_bytes_visual"]
            lines.append(f"| {_configuration_label(row)} (configuration {row['configuration']}) | "
                         f"{_number(row['flops_ratio'])}x | {_number(row['speedup'])}x | {smaller:.1f}x smaller |")
    lines.append(f"| full model | 1 | 1 ({_number(full['prefill_s'])} s) | {_number(full['kv_bytes_visual'] / 2**20)} MiB |")
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


def render_ca_positions(root: Path, path: str) -> str:
    """scripts/qwen_ca_positions.sh's test accuracy: the full model, then every configuration of each variant."""
    results = json.loads((root / path).read_text())
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
    rows = json.loads((root / path).read_text())
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
    results = json.loads((root / path).read_text())
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


def render_stages(root: Path, path: str) -> str:
    """How long a run's stages took, as its results file recorded them."""
    stages = json.loads((root / path).read_text())["stages"]
    timed = [(name, stage["seconds"]) for name, stage in stages.items()
             if isinstance(stage, dict) and stage.get("seconds")]
    timed += [(f"added ({', '.join(stage['methods'])})", stage["seconds"]) for stage in stages.get("added", [])]
    total = sum(seconds for _, seconds in timed)
    return (f"- `{path}`: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timed)
            + f"; {total / 60:.1f} min in all.\n")


RENDERERS: dict[str, Callable[..., str]] = {"prefill": render_prefill, "batched": render_batched,
                                           "engine": render_engine, "demo": render_demo, "stages": render_stages,
                                           "ca-positions": render_ca_positions}


def documents(root: Path) -> list[Path]:
    return sorted({path for pattern in DOCUMENTS for path in root.glob(pattern)})


def render(text: str, root: Path, where: str = "") -> str:
    """`text` with every generated block rewritten from its file."""

    def block(match: re.Match) -> str:
        name, *arguments = match["spec"].split()
        if name not in RENDERERS:
            raise ValueError(f"{where}: unknown renderer {name!r} (known: {', '.join(RENDERERS)})")
        return match.group(1) + RENDERERS[name](root, *arguments) + match.group(4)

    return BLOCK.sub(block, text)


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
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = parser.parse_args(argv)
    stale = stale_documents()
    if args.check:
        for name in stale:
            print(f"{name}: a generated block differs from its results (run scripts/docs_figures.py)")
        return 1 if stale else 0
    for name, rendered in stale.items():
        write_text(ROOT / name, rendered)
        print(f"rewrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
