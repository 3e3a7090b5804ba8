"""Visual representation drift (the paper's Fig. 3): linear CKA between the image tokens' hidden states at
every pair of layers.

Linear CKA (Kornblith et al., 2019) compares two representations of the same n tokens, X (n, d1) and Y (n, d2):
CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc. It is 1 for identical
representations and invariant to orthogonal transforms and isotropic scaling, so it shows whether a layer
*changed* what the image tokens encode, not merely their norm. States are taken per sample (the tokens of one
image are the n observations) and CKA matrices are averaged over a task's samples. State l is the input of
layer l; state L the last layer's output (before the final norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure

from visor.files import save_figure


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, d) representations of the same n items."""
    x = x.to(torch.float64) - x.to(torch.float64).mean(dim=0)
    y = y.to(torch.float64) - y.to(torch.float64).mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def cka_matrix(states: torch.Tensor) -> torch.Tensor:
    """(M, M) linear CKA between M representations (M, n, d) of the same items, via centred Gram matrices
    (<Kx, Ky>_F = ||Y^T X||_F^2), all pairs in one product."""
    states = states.to(torch.float64)
    states = states - states.mean(dim=1, keepdim=True)
    grams = (states @ states.transpose(1, 2)).flatten(1)  # (M, n*n)
    products = grams @ grams.T
    norms = products.diagonal().sqrt()
    return products / (norms[:, None] * norms[None, :])


@dataclass
class VisualStates:
    """Forward hooks that keep the image tokens' hidden states entering each layer and leaving the last one."""

    language_model: torch.nn.Module
    states: list[torch.Tensor] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __enter__(self) -> "VisualStates":
        layers = self.language_model.layers
        for layer in layers:
            self._hooks.append(layer.register_forward_pre_hook(lambda _, args: self.states.append(args[0].detach())))
        self._hooks.append(layers[-1].register_forward_hook(
            lambda _, args, output: self.states.append((output[0] if isinstance(output, tuple) else output).detach())))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def take(self) -> torch.Tensor:
        """(L+1, B, S, d) states of the forward run inside the context."""
        return torch.stack(self.states)


@dataclass
class DriftAccumulator:
    """Per-task mean CKA matrices over samples; `max_tokens` image tokens per sample at most (evenly strided)."""

    max_tokens: int = 1024
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, tasks: list[str], states: torch.Tensor, visual: torch.Tensor) -> None:
        """`states` (L+1, B, S, d) of a batch, `visual` (B, S) its image positions."""
        for row, task in enumerate(tasks):
            tokens = states[:, row, visual[row].to(states.device)]
            if tokens.shape[1] < 2:
                continue
            stride = max(1, -(-tokens.shape[1] // self.max_tokens))
            matrix = cka_matrix(tokens[:, ::stride]).cpu()
            self.sums[task] = self.sums.get(task, 0) + matrix
            self.counts[task] = self.counts.get(task, 0) + 1

    def result(self, task_groups: dict[str, str]) -> dict:
        per_task = {task: self.sums[task] / self.counts[task] for task in self.sums}
        by_group: dict[str, list[torch.Tensor]] = {}
        for task, matrix in per_task.items():
            by_group.setdefault(task_groups.get(task, "all"), []).append(matrix)
        groups = {name: torch.stack(items).mean(dim=0) for name, items in by_group.items()}
        return {
            "states": "state l enters layer l; the last state leaves the last layer",
            "tasks": {task: {"group": task_groups.get(task, "all"), "samples": self.counts[task],
                             "cka": _rounded(matrix)} for task, matrix in per_task.items()},
            "task_groups": {name: {"cka": _rounded(matrix)} for name, matrix in groups.items()},
        }


def layer_drift(cka: list[list[float]]) -> list[float]:
    """1 - CKA between a layer's input and output image-token states: how much each layer rewrites them."""
    return [round(1.0 - cka[layer][layer + 1], 6) for layer in range(len(cka) - 1)]


def _rounded(matrix: torch.Tensor) -> list[list[float]]:
    return [[round(value, 6) for value in row] for row in matrix.tolist()]


def plot_drift(result: dict, path) -> None:
    """A CKA heat map per task (and per task group)."""
    panels = [(f"{name} tasks", entry["cka"]) for name, entry in sorted(result["task_groups"].items())]
    panels += [(task, entry["cka"]) for task, entry in result["tasks"].items()]
    low = min(min(min(row) for row in matrix) for _, matrix in panels)
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3.4 * columns, 3.1 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).flatten()
    for axes, (title, matrix) in zip(grid, panels):
        image = axes.imshow(matrix, vmin=min(low, 0.9), vmax=1, cmap="viridis", origin="lower")
        axes.set(title=title, xlabel="state l (input of layer l)", ylabel="state l (input of layer l)")
    for axes in grid[len(panels):]:
        axes.set_axis_off()
    figure.colorbar(image, ax=grid.tolist(), label="linear CKA of image tokens", shrink=0.8)
    save_figure(figure, path)
