"""Peak memory of `visor convert` against the checkpoint's size on disk (benchmarks/convert/).

    .venv/bin/python scripts/convert_memory.py --preset llava-ov-0.5b --dtype bfloat16 --output benchmarks/convert

Saves a random-weight stock checkpoint of the preset's shapes to a temporary folder, converts it in a child
process (`visor convert`, default schedule, and `--dense`) and reads the child's peak resident memory
(getrusage, RUSAGE_CHILDREN, one child at a time); the baseline is a child that only imports what `visor convert`
imports. Weights are random: memory depends on the shapes only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from visor.files import write_json
from visor.presets import PRESETS


def peak_rss_of(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of `command`, run as the only child of a fresh helper process (whose
    RUSAGE_CHILDREN maximum is then that command's own)."""
    helper = [sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *command]
    start = time.perf_counter()
    output = subprocess.run(helper, check=True, capture_output=True, text=True).stdout.split()
    return int(output[-1]) * 1024, time.perf_counter() - start


def save_random_stock(folder: Path, preset: str, dtype: torch.dtype) -> Path:
    """A stock checkpoint of `preset`'s shapes with random weights, written without a float32 copy: allocated on
    the meta device, then materialised in `dtype` (memory depends on the shapes only)."""
    from visor.backbones import backbone_for

    config = PRESETS[preset]()
    with torch.device("meta"):
        model = backbone_for(config).stock_model_class(config).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # as a checkpoint of tied embeddings is saved: once
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(folder)
    return folder


IMPORT_BASELINE = [sys.executable, "-c", "import torch, transformers, visor.convert, visor.backbones"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-ov-0.5b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        stock = save_random_stock(Path(scratch) / "stock", args.preset, getattr(torch, args.dtype))
        size = sum(path.stat().st_size for path in stock.glob("*.safetensors"))
        baseline, _ = peak_rss_of(IMPORT_BASELINE)
        in_memory = ("from visor.backbones import family; from visor.modeling import load_stock; "
                     "from transformers import AutoConfig; import sys; "
                     "visor = family(AutoConfig.from_pretrained(sys.argv[1])).VISOR_MODEL; "
                     "visor.from_stock(load_stock(visor.backbone_class.stock_model_class, sys.argv[1]))"
                     ".save_pretrained(sys.argv[2])")
        convert = [sys.executable, "-m", "visor.cli", "convert", "--model", str(stock), "--output"]
        for name, command in (
            ("visor convert, default schedule", [*convert, str(Path(scratch) / "default")]),
            ("visor convert --dense", [*convert, str(Path(scratch) / "dense"), "--dense"]),
            ("for comparison: load the stock model, then from_stock(model)",
             [sys.executable, "-c", in_memory, str(stock), str(Path(scratch) / "in-memory")]),
        ):
            peak, seconds = peak_rss_of(command)
            rows.append(dict(conversion=name, peak_bytes=peak, peak_over_size=peak / size,
                             above_baseline_over_size=(peak - baseline) / size, seconds=round(seconds, 1)))
            print(f"{name}: peak {peak / 2**30:.2f} GiB = {peak / size:.2f}x the {size / 2**30:.2f} GiB on disk "
                  f"({(peak - baseline) / size:.2f}x above the {baseline / 2**30:.2f} GiB import baseline), {seconds:.0f} s")
    write_json(args.output / "convert_memory.json", dict(
        preset=args.preset, dtype=args.dtype, size_on_disk_bytes=size, import_baseline_bytes=baseline, rows=rows,
        command=f"python scripts/convert_memory.py --preset {args.preset} --dtype {args.dtype} --output {args.output}",
        machine=f"{torch.get_num_threads()} threads, torch {torch.__version__}"))


if __name__ == "__main__":
    main()
