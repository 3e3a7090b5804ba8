"""The VISOR model: layer loop (SA / CA / text), CA block, CPE, token layout."""

from visor.modeling.freezing import (
    freeze_base, freeze_vision_tower, trainable_parameter_names, trainable_parameters, unfreeze_all,
)
from visor.modeling.visor import VisorForConditionalGeneration, load_llava

__all__ = [
    "VisorForConditionalGeneration",
    "freeze_base",
    "freeze_vision_tower",
    "load_llava",
    "trainable_parameter_names",
    "trainable_parameters",
    "unfreeze_all",
]
