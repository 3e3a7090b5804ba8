"""Which parameters train in each stage.

Stage 1 trains only what VISOR adds to the stock model: the CA blocks (with their gates) and the CPE; the
vision tower, projector, decoder layers, embeddings and head stay exactly as converted. Stage 2 trains
everything. Freezing is `requires_grad`, so optimizers built on `trainable_parameters(model)` never see a
frozen weight and frozen weights get no `.grad` at all.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

STAGE1_MODULES = ("cross_attention", "position_encoding")  # what stage 1 trains of what VISOR adds (not the router)


def _is_new(name: str) -> bool:
    return name.split(".", 1)[0] in STAGE1_MODULES


def freeze_base(model: nn.Module) -> nn.Module:
    """Stage 1: freeze every base weight; only the CA blocks (incl. gates) and the CPE stay trainable.

    Raises a ValueError when the model has no VISOR module to train (e.g. a dense config without CPE),
    because a stage-1 run would then silently train nothing.
    """
    new = 0
    for name, parameter in model.named_parameters():
        trainable = _is_new(name)
        parameter.requires_grad_(trainable)
        new += trainable
    if not new:
        raise ValueError(
            f"{type(model).__name__} has no VISOR modules ({', '.join(STAGE1_MODULES)}) to train: freezing the base "
            "would leave nothing trainable"
        )
    return model


def unfreeze_all(model: nn.Module) -> nn.Module:
    """Stage 2: every parameter trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients, in `named_parameters` order."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters to hand to an optimizer (those that require gradients)."""
    return (parameter for parameter in model.parameters() if parameter.requires_grad)
