"""Attention share per layer (the paper's Fig. 2): where do text queries put their attention mass?

Every key position of a prompt-plus-answer sequence belongs to one group, found from the ids alone:

    prefix    text before the (first) image, e.g. the chat template's `user:`
    image     the image tokens
    question  prompt text after the image (the question and the `assistant:` tag)
    answer    the model's own greedy answer, fed back (what it attends to while answering)

Queries are the question tokens and the answer tokens. Per query, a layer's attention (averaged over heads)
splits over the four groups and the shares sum to 1 (padding keys get exactly zero weight). Shares are averaged
over a sample's queries of a role, then over the samples of a task.

With far more image than text tokens, even uniform attention gives the image most of the mass, so the result
also holds each role's `uniform` shares (the fraction of the keys a query can see that are in each group):
a layer reads the image *more than chance* where its image share exceeds the uniform one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure

from visor.files import save_figure

GROUPS = ("prefix", "image", "question", "answer")
ROLES = ("question", "answer")
PADDING = -1


def token_groups(visual: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """(B, S) group index (into GROUPS) of every position, PADDING where the mask is 0; `visual` (B, S) marks the
    visual tokens (an image's or a video's: `Backbone.visual_token_mask`), the "image" group.

    Positions from `prompt_length` on are the answer; prompt text is prefix or question by whether a visual
    token came before it.
    """
    valid = attention_mask.bool()
    image = visual.bool()
    after_image = image.long().cumsum(dim=1) > 0
    groups = torch.where(after_image, GROUPS.index("question"), GROUPS.index("prefix"))
    groups = torch.where(image, GROUPS.index("image"), groups)
    groups[:, prompt_length:] = GROUPS.index("answer")
    return torch.where(valid, groups, PADDING)


def group_mass(weights: torch.Tensor, key_groups: torch.Tensor) -> torch.Tensor:
    """(B, Q, G) attention mass each query puts on each group, from softmax weights (B, H, Q, K) (head mean)."""
    one_hot = torch.nn.functional.one_hot(key_groups.clamp(min=0), len(GROUPS)).to(torch.float64)
    one_hot = one_hot * (key_groups >= 0)[..., None]
    return torch.einsum("bqk,bkg->bqg", weights.to(torch.float64).mean(dim=1), one_hot)


@dataclass
class ShareAccumulator:
    """Collects per-task mean shares (layer, role, group) from the weights a `probe` hands over."""

    num_layers: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (L, R, G) sum over samples
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (L, R) samples with such queries
    uniform: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (R, G) sum of uniform shares
    uniform_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (R,) samples with such queries
    _tasks: list[str] = field(default_factory=list)
    _groups: torch.Tensor | None = None

    def start_batch(self, tasks: list[str], groups: torch.Tensor) -> None:
        """The next forward's sample tasks and (B, S) token groups (from `token_groups`)."""
        self._tasks, self._groups = tasks, groups
        one_hot = torch.nn.functional.one_hot(groups.clamp(min=0), len(GROUPS)).to(torch.float64)
        visible = (one_hot * (groups >= 0)[..., None]).cumsum(dim=1)  # causal: keys at or before each query
        per_query = visible / visible.sum(dim=-1, keepdim=True).clamp(min=1)
        per_role, queries = _role_means(groups, per_query)
        for row, task in enumerate(tasks):
            present = queries[row] > 0
            self.uniform.setdefault(task, torch.zeros(len(ROLES), len(GROUPS), dtype=torch.float64))
            self.uniform_counts.setdefault(task, torch.zeros(len(ROLES), dtype=torch.float64))
            self.uniform[task][present] += per_role[row, present]
            self.uniform_counts[task] += present.to(torch.float64)

    def __call__(self, layer: int, weights: torch.Tensor) -> None:
        groups = self._groups.to(weights.device)
        per_role, queries = _role_means(groups, group_mass(weights, groups))
        for row, task in enumerate(self._tasks):
            if task not in self.sums:
                self.sums[task] = torch.zeros(self.num_layers, len(ROLES), len(GROUPS), dtype=torch.float64)
                self.counts[task] = torch.zeros(self.num_layers, len(ROLES), dtype=torch.float64)
            present = queries[row] > 0
            self.sums[task][layer, present] += per_role[row, present].cpu()
            self.counts[task][layer] += present.cpu().to(torch.float64)

    def result(self, task_groups: dict[str, str]) -> dict:
        """JSON-ready shares: per task and per task group (easy/hard), `shares[role][group]` = a value per layer."""
        per_task = {task: self.sums[task] / self.counts[task][..., None] for task in self.sums}
        uniform = {task: self.uniform[task] / self.uniform_counts[task][:, None] for task in self.sums}
        by_group: dict[str, list[str]] = {}
        for task in per_task:
            by_group.setdefault(task_groups.get(task, "all"), []).append(task)
        return {
            "groups": list(GROUPS),
            "roles": list(ROLES),
            "layers": list(range(self.num_layers)),
            "tasks": {task: {"group": task_groups.get(task, "all"), "shares": _nested(per_task[task]),
                             "uniform": _nested_uniform(uniform[task])} for task in per_task},
            "task_groups": {
                name: {"shares": _nested(torch.stack([per_task[t] for t in tasks]).nanmean(dim=0)),
                       "uniform": _nested_uniform(torch.stack([uniform[t] for t in tasks]).nanmean(dim=0))}
                for name, tasks in by_group.items()},
        }


def _role_means(groups: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean (B, R, G) of per-query `values` (B, Q, G) over each role's queries, and the query counts
    (B, R). The queries are the last Q positions of `groups` (B, S)."""
    query_groups = groups[:, groups.shape[1] - values.shape[1]:]
    roles = torch.stack([query_groups == GROUPS.index(role) for role in ROLES], dim=-1).to(torch.float64)
    queries = roles.sum(dim=1)
    return torch.einsum("bqr,bqg->brg", roles, values) / queries.clamp(min=1)[..., None], queries


def _nested(shares: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    return {role: {group: [_finite(v) for v in shares[:, r, g].tolist()] for g, group in enumerate(GROUPS)}
            for r, role in enumerate(ROLES)}


def _nested_uniform(uniform: torch.Tensor) -> dict[str, dict[str, float]]:
    return {role: {group: _finite(uniform[r, g].item()) for g, group in enumerate(GROUPS)}
            for r, role in enumerate(ROLES)}


def _finite(value: float) -> float | None:
    return None if value != value else round(value, 6)


LINES = (("question", "image", "question → image"), ("answer", "image", "answer → image"),
         ("answer", "question", "answer → question"))


def plot_attention_shares(result: dict, path) -> None:
    """One panel per task group: question→image, answer→image and answer→question share per layer (dashed:
    the share uniform attention would give)."""
    names = sorted(result["task_groups"])
    figure = Figure(figsize=(4.5 * len(names), 3.8), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        entry = result["task_groups"][name]
        for role, group, label in LINES:
            values = [float("nan") if v is None else v for v in entry["shares"][role][group]]
            line, = axes.plot(result["layers"], values, marker="o", label=label)
            uniform = entry["uniform"][role][group]
            if uniform is not None:
                axes.axhline(uniform, color=line.get_color(), linestyle="--", linewidth=0.8)
        axes.set(title=f"{name} tasks", xlabel="layer", ylabel="attention share", ylim=(0, 1),
                 xticks=result["layers"])
        axes.legend(fontsize="small")
    save_figure(figure, path)
