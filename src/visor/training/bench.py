"""`visor bench --train`: what one optimizer step of each training recipe costs in memory and time.

For one preset's shapes it saves a stock model with random weights (fp32, seed 0) to a temporary folder, then for
every recipe (`full`, `visor-stage1`, `visor-universal`), with and without activation checkpointing, and every
visual-token count it builds the recipe's `Trainer` from that folder, exactly as `visor train` does (the
recipe's defaults, `mixed_precision: auto`, batch 1), and runs two optimizer steps on one nominal image sample:

- the image is `Backbone.nominal_pixel_inputs(N)` (random pixels of the image `visor.flops` prices at N visual
  tokens), so the vision tower runs as in training; the language model sees that image's packed tokens
  (`llm_visual_tokens`) and then `text_tokens` labelled text tokens;
- `visor-universal` trains its largest configuration (the most expensive one a step can draw);
- step 2 is timed (step 1 allocates the optimizer's state), and the peak memory spans both steps: an
  accelerator's allocator peak, or on a CPU the process's resident memory (weights and the imported libraries
  included).

Every row runs in a fresh child process, so that no row inherits another's memory and a row the machine cannot
hold is killed alone. Token counts run in ascending order per (recipe, checkpointing); once two have been
measured, the next row's peak is extrapolated linearly in the language model's visual tokens, and a row predicted
above the memory limit (by default the memory available when the bench starts) is not run: it is reported with
its prediction. Measured rows after the second carry their prediction too, so the extrapolation can be checked.
"""

from __future__ import annotations

import gc
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from tqdm import tqdm

from visor.backbones import backbone_for, family
from visor.device import available_memory_bytes, default_device
from visor.files import save_figure, write_json
from visor.presets import preset_config
from visor.training.recipes import RECIPES, check_recipe

DEFAULT_VISUAL_TOKENS = (1458, 2916, 7290)  # LLaVA-OV-0.5B: 2, 4 and 10 crops of 729 tokens


@dataclass(frozen=True)
class TrainBenchPlan:
    """What to measure; validated on creation, before any model is built."""

    preset: str
    visual_tokens: tuple[int, ...] = DEFAULT_VISUAL_TOKENS
    text_tokens: int = 64
    recipes: tuple[str, ...] = RECIPES
    checkpointing: tuple[bool, ...] = (False, True)
    memory_limit_gib: float | None = None  # rows predicted above it are not run; None: the memory available now

    def __post_init__(self):
        backbone = backbone_for(preset_config(self.preset))  # an unknown preset raises here
        if not self.visual_tokens or any(count <= 0 for count in self.visual_tokens):
            raise ValueError(f"visual tokens must be positive counts, got {list(self.visual_tokens)}")
        if self.text_tokens < 1:
            raise ValueError(f"text_tokens must be at least 1, got {self.text_tokens}")
        if not self.recipes:
            raise ValueError("no recipes to measure")
        for recipe in self.recipes:
            check_recipe(recipe)
        if not self.checkpointing:
            raise ValueError("checkpointing: give at least one of False, True")
        if self.memory_limit_gib is not None and not self.memory_limit_gib > 0:
            raise ValueError(f"the memory limit must be positive, got {self.memory_limit_gib} GiB")
        for visual in self.visual_tokens:  # raises where the family has no image of that many tokens
            backbone.nominal_pixel_inputs(visual)

    def memory_limit_bytes(self) -> int:
        if self.memory_limit_gib is not None:
            return int(self.memory_limit_gib * 2**30)
        return available_memory_bytes(default_device())  # where `visor train` runs: the accelerator if any


@dataclass
class TrainBenchRow:
    recipe: str
    activation_checkpointing: bool
    visual_tokens: int
    llm_visual_tokens: int
    text_tokens: int
    outcome: str  # "measured"; "killed" (the process died); not run: "predicted above the limit" or after a kill
    trainable_parameters: int | None = None
    step_s: float | None = None
    peak_memory_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    device: str | None = None
    mixed_precision: str | None = None


class NominalImageSample:
    """A `DataSource` of one sample, the same at every index: the nominal image of `visual_tokens`, then
    `text_tokens` random text tokens, every one of them labelled (the loss a long answer gives)."""

    tasks = ("nominal image",)
    num_patch_classes = 0

    def __init__(self, model_config, visual_tokens: int, text_tokens: int):
        backbone = backbone_for(model_config)
        self.pixels = backbone.nominal_pixel_inputs(visual_tokens)
        self.llm_visual_tokens = backbone.nominal_visual_tokens(visual_tokens)
        image_token = model_config.image_token_id
        generator = torch.Generator().manual_seed(visual_tokens)
        text = torch.randint(0, model_config.text_config.vocab_size, (text_tokens,), generator=generator)
        text[text == image_token] = 0
        self.input_ids = torch.cat([torch.full((self.llm_visual_tokens,), image_token), text])[None]
        self.labels = torch.cat([torch.full((self.llm_visual_tokens,), -100), text])[None]

    def train_batch(self, indices) -> dict[str, torch.Tensor]:
        if len(indices) != 1:
            raise ValueError(f"the training bench runs batches of one sample, got {len(indices)}")
        return dict(input_ids=self.input_ids, attention_mask=torch.ones_like(self.input_ids), labels=self.labels,
                    **self.pixels)

    def eval_batches(self, split: str, per_task: int, batch_size: int):
        return iter(())  # the bench never validates

    def decode(self, token_ids) -> str:
        return ""


def run_train_bench(plan: TrainBenchPlan, limit: int) -> list[TrainBenchRow]:
    """Every (recipe, checkpointing, visual tokens) row of `plan`, each in its own child process; rows whose
    extrapolated peak is above `limit` bytes (`plan.memory_limit_bytes()`) are not run."""
    config = preset_config(plan.preset)
    llm_tokens = {visual: backbone_for(config).nominal_visual_tokens(visual) for visual in plan.visual_tokens}
    rows = []
    series = [(recipe, checkpointing) for recipe in plan.recipes for checkpointing in plan.checkpointing]
    with tempfile.TemporaryDirectory(prefix="visor-train-bench-") as scratch, \
            tqdm(total=len(series) * len(plan.visual_tokens), desc="visor bench --train", unit="row") as progress:
        stock = Path(scratch) / "stock"
        progress.set_postfix_str(f"saving a random {plan.preset}")
        _in_child(save_random_stock, plan.preset, stock)
        for recipe, checkpointing in series:
            measured: list[TrainBenchRow] = []
            killed = False
            for visual in sorted(plan.visual_tokens):
                progress.set_postfix_str(f"{recipe}{' + ckpt' if checkpointing else ''} Nv={visual}")
                row = TrainBenchRow(recipe, checkpointing, visual, llm_tokens[visual], plan.text_tokens,
                                    outcome="predicted above the limit",
                                    predicted_peak_bytes=extrapolated_peak(measured, llm_tokens[visual]))
                if killed:
                    row.outcome = "not run: a smaller count was killed"
                elif row.predicted_peak_bytes is None or row.predicted_peak_bytes <= limit:
                    folder = Path(scratch) / f"{recipe}-{int(checkpointing)}-{visual}"
                    try:
                        result = _in_child(measure_step, plan.preset, recipe, checkpointing, stock, folder, visual,
                                           plan.text_tokens)
                    except BrokenProcessPool:
                        row.outcome, killed = "killed", True
                    else:
                        row.outcome = "measured"
                        for name, value in result.items():
                            setattr(row, name, value)
                        measured.append(row)
                rows.append(row)
                progress.update()
    return rows


def extrapolated_peak(measured: list[TrainBenchRow], llm_visual_tokens: int) -> int | None:
    """The peak memory at `llm_visual_tokens`, on the line through the last two measured rows (None before two)."""
    if len(measured) < 2:
        return None
    (x0, y0), (x1, y1) = [(row.llm_visual_tokens, row.peak_memory_bytes) for row in measured[-2:]]
    return round(y1 + (y1 - y0) / (x1 - x0) * (llm_visual_tokens - x1))


def _in_child(function, *args):
    """`function(*args)` in a fresh (spawned) process; BrokenProcessPool when that process dies."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet) as pool:
        return pool.submit(function, *args).result()


def _quiet() -> None:
    """A child's transformers loading bars off, as `visor`'s commands turn them off: the bench has its own bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def save_random_stock(preset: str, folder: Path) -> None:
    """The preset's stock model with seeded random weights, saved as a checkpoint every recipe can start from."""
    config = preset_config(preset)
    torch.manual_seed(0)
    backbone_for(config).stock_model_class(config).save_pretrained(folder)


def measure_step(preset: str, recipe: str, checkpointing: bool, stock: Path, folder: Path, visual: int,
                 text: int) -> dict:
    """Two optimizer steps of `recipe` from `stock` (the preset's checkpoint): step 2's seconds and the peak memory
    of both."""
    from visor.benchmarking import PeakMemory, timed
    from visor.training.engine import Trainer
    from visor.training.settings import load_settings

    config = preset_config(preset)
    overrides = dict(batch_size=1, max_steps=2, eval_every=0, save_every=0, activation_checkpointing=checkpointing)
    if recipe == "visor-universal":  # always the largest configuration
        visor_config = family(config).VISOR_MODEL.config_class.from_stock_config(config)
        overrides["configuration_weights"] = [float(index == visor_config.largest_configuration)
                                              for index in range(len(visor_config.configurations))]
    settings = load_settings(recipe, overrides=overrides)
    data = NominalImageSample(config, visual, text)
    trainer = Trainer(recipe, data, folder, settings, init=stock, progress=False)
    device = trainer.accelerator.device
    gc.collect()
    with PeakMemory(device) as peak:
        trainer.step(1)
        seconds, _ = timed(device, lambda: trainer.step(2))
    return dict(step_s=seconds, peak_memory_bytes=peak.bytes, device=str(device),
                trainable_parameters=sum(p.numel() for p in trainer.module.parameters() if p.requires_grad),
                mixed_precision=trainer.accelerator.mixed_precision)


# ---- outputs -----------------------------------------------------------------------------------------------------
def _label(row: TrainBenchRow) -> str:
    return row.recipe + (" + checkpointing" if row.activation_checkpointing else "")


def write_train_outputs(rows: list[TrainBenchRow], plan: TrainBenchPlan, limit: int, output: str | Path) -> list[Path]:
    """`train.json` (the plan, the memory limit and the rows) and `train.png` (peak memory and step time against
    visual tokens) in `output`; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "train.json", output / "train.png"]
    write_json(paths[0], dict(plan=asdict(plan), memory_limit_bytes=limit, rows=[asdict(row) for row in rows]))

    lines: dict[str, list[TrainBenchRow]] = {}
    for row in rows:
        lines.setdefault(_label(row), []).append(row)
    palette = colormaps["tab10"]
    figure = Figure(figsize=(12, 5), layout="constrained")
    memory, time = figure.subplots(1, 2)
    for color, (label, series) in enumerate(lines.items()):
        style = dict(color=palette(color), linestyle="--" if series[0].activation_checkpointing else "-")
        known = [row for row in series if row.peak_memory_bytes is not None]
        memory.plot([row.visual_tokens for row in known], [row.peak_memory_bytes / 2**30 for row in known],
                    marker="o", label=label, **style)
        guessed = [row for row in series if row.outcome != "measured" and row.predicted_peak_bytes is not None]
        if known and guessed:
            memory.plot([known[-1].visual_tokens] + [row.visual_tokens for row in guessed],
                        [known[-1].peak_memory_bytes / 2**30] + [row.predicted_peak_bytes / 2**30 for row in guessed],
                        marker="o", markerfacecolor="none", linestyle=":", color=style["color"])
        time.plot([row.visual_tokens for row in known], [row.step_s for row in known], marker="o", label=label,
                  **style)
    memory.axhline(limit / 2**30, color="grey", linewidth=1)
    memory.annotate("memory limit", (0, limit / 2**30), xycoords=("axes fraction", "data"), va="bottom",
                    fontsize="small", color="grey")
    memory.set(xlabel="visual tokens", ylabel="peak memory (GiB)",
               title="Peak memory of an optimizer step (hollow: extrapolated, not run)")
    time.set(xlabel="visual tokens", ylabel="seconds", title="One optimizer step (batch 1)")
    memory.legend(fontsize="small")
    save_figure(figure, paths[1])
    return paths


def train_table(rows: list[TrainBenchRow]) -> str:
    lines = [f"{'recipe':<34}{'Nv':>6}{'LLM Nv':>8}{'trainable M':>13}{'step s':>9}{'peak GiB':>10}"
             f"{'predicted GiB':>15}  outcome"]
    for row in rows:
        def gib(value):
            return "-" if value is None else f"{value / 2**30:.2f}"

        trainable = "-" if row.trainable_parameters is None else f"{row.trainable_parameters / 1e6:.1f}"
        step = "-" if row.step_s is None else f"{row.step_s:.3g}"
        lines.append(f"{_label(row):<34}{row.visual_tokens:>6}{row.llm_visual_tokens:>8}{trainable:>13}{step:>9}"
                     f"{gib(row.peak_memory_bytes):>10}{gib(row.predicted_peak_bytes):>15}  {row.outcome}")
    return "\n".join(lines)
