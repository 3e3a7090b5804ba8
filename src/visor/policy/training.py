"""Training the router on a label table.

`multilabel`: binary cross-entropy on "configuration c is good for this sample" for every c.
`softmax` (the paper's): cross-entropy on the cheapest good configuration.
The router is tiny and its inputs are precomputed, so this is full-batch AdamW on features: seconds on a CPU.
`fit_novelty_guard` then keeps the same features for the router's novelty guard.
"""

from __future__ import annotations

import torch
from torch import nn

from visor.modeling.novelty import DEFAULT_QUANTILE, MAX_REFERENCES, NoveltyGuard
from visor.modeling.router import ConfigurationRouter
from visor.policy.labels import LabelTable


def cheapest_good(good: torch.Tensor) -> torch.Tensor:
    """(N,) the cheapest good configuration of each sample (the largest when none is good); configurations go
    from cheapest to largest."""
    ordered = good.clone()
    ordered[:, -1] = True
    return ordered.float().argmax(dim=1)


def train_router(router: ConfigurationRouter, table: LabelTable, rule: str = "probability", ratio: float = 0.99,
                 steps: int = 500, lr: float = 3e-3, weight_decay: float = 1e-2, seed: int = 0) -> list[float]:
    """Fit the router in place on `table`; returns the loss curve (one value per step)."""
    if len(table) == 0:
        raise ValueError("the label table is empty")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if table.num_configurations != router.num_configurations:
        raise ValueError(
            f"the label table has {table.num_configurations} configurations, the router {router.num_configurations}"
        )
    good = table.good(rule, ratio)
    torch.manual_seed(seed)
    features = table.features.to(router.norm.weight.device, router.norm.weight.dtype)
    if router.mode == "multilabel":
        target = good.float().to(features.device)
        loss_function = nn.BCEWithLogitsLoss()
    else:
        target = cheapest_good(good).to(features.device)
        loss_function = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    router.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_function(router(features), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    router.eval()
    router.config.router_guarantee = None  # certified for the old router's decisions
    router.config.router_training = dict(samples=len(table), tasks=sorted(set(table.tasks)), rule=rule, ratio=ratio,
                                         steps=steps, seed=seed, final_loss=losses[-1])
    return losses


def fit_novelty_guard(model, table: LabelTable, quantile: float = DEFAULT_QUANTILE, seed: int = 0,
                      max_references: int = MAX_REFERENCES) -> float:
    """Give `model`'s router a novelty guard fitted on the label table's features (the router's training split)
    and record its shape and κ in the model's config, so the saved model loads with it. Returns κ."""
    router = model.router
    if router.novelty is None:
        router.novelty = NoveltyGuard(table.features.shape[1], 0, model.config.router_novelty_neighbours).to(
            router.norm.weight.device)
    threshold = router.novelty.fit(table.features, quantile, max_references, seed)
    model.config.router_novelty_references = len(router.novelty.references)
    model.config.router_novelty_threshold = threshold
    model.config.router_guarantee = None  # certified for the decisions without this guard
    return threshold
