"""The VISOR model, family-agnostic: the layer loop (SA / CA / text), CA block, CPE, router, cache, token layout.

Each model family's concrete classes live in its backbone adapter (`visor.backbones`).
"""

from visor.modeling.freezing import (
    freeze_base, trainable_parameter_names, trainable_parameters, unfreeze_all,
)
from visor.modeling.visor import VisorModel, load_stock

__all__ = [
    "VisorModel",
    "freeze_base",
    "load_stock",
    "trainable_parameter_names",
    "trainable_parameters",
    "unfreeze_all",
]
