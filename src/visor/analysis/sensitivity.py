"""Layer sensitivity (the paper's Fig. 4): accuracy when image tokens are removed from a span of layers.

In a removed span every layer runs on text only (a `probe` blind layer: text cannot attend to image tokens,
image tokens are not updated there, decoding included), which is exactly VISOR's text layer. Later layers see
the image tokens again, as they were before the span. A task that loses much accuracy when a span goes blind
needs vision there.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from visor.analysis.scoring import correctness
from visor.files import save_figure


def spans(num_layers: int, lengths: list[int] | None = None) -> list[tuple[int, int]]:
    """Every contiguous span [start, end) of the given lengths (default: every length, 1..L)."""
    lengths = lengths or list(range(1, num_layers + 1))
    bad = [length for length in lengths if not 1 <= length <= num_layers]
    if bad:
        raise ValueError(f"span lengths {bad} out of range 1..{num_layers}")
    return [(start, start + length) for length in lengths for start in range(num_layers - length + 1)]


def layer_sensitivity(model, data, batches, max_new_tokens: int, span_list: list[tuple[int, int]],
                      progress: bool = True) -> dict:
    """Accuracy per task with no span removed (`full`) and with each span blind."""
    full = correctness(model, data, batches, max_new_tokens).accuracy()
    results = []
    for start, end in tqdm(span_list, desc="layer sensitivity", disable=not progress, leave=False):
        scores = correctness(model, data, batches, max_new_tokens, blind=range(start, end)).accuracy()
        results.append({"start": start, "end": end, "accuracy": scores})
    return {"num_layers": model.config.text_config.num_hidden_layers, "full": full, "spans": results}


def single_layer_drop(result: dict) -> list[float | None]:
    """Mean accuracy lost when one layer alone is blind (None for layers the sweep did not remove alone)."""
    drop: list[float | None] = [None] * result["num_layers"]
    for span in result["spans"]:
        if span["end"] - span["start"] == 1:
            drop[span["start"]] = round(result["full"]["mean"] - span["accuracy"]["mean"], 3)
    return drop


def plot_sensitivity(result: dict, path) -> None:
    """A heat map per task: accuracy drop (points) by span start (x) and span length (y)."""
    layers = result["num_layers"]
    tasks = list(result["full"])
    lengths = sorted({span["end"] - span["start"] for span in result["spans"]})
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    figure = Figure(figsize=(3.8 * columns, 3.2 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).flatten()
    for axes, task in zip(grid, tasks):
        drop = np.full((len(lengths), layers), np.nan)
        for span in result["spans"]:
            drop[lengths.index(span["end"] - span["start"]), span["start"]] = (
                result["full"][task] - span["accuracy"][task])
        image = axes.imshow(drop, cmap="magma_r", vmin=0, vmax=max(1.0, result["full"][task]), origin="lower",
                            aspect="auto")
        axes.set(title=f"{task} (full {result['full'][task]:.0f}%)", xlabel="first blind layer",
                 ylabel="blind span length", xticks=range(layers), yticks=range(len(lengths)), yticklabels=lengths)
        figure.colorbar(image, ax=axes, label="accuracy drop (points)")
    for axes in grid[len(tasks):]:
        axes.set_axis_off()
    save_figure(figure, path)
