"""The VISOR model: layer loop (SA / CA / text), CA block, CPE, token layout."""

from visor.modeling.visor import VisorForConditionalGeneration, load_llava

__all__ = ["VisorForConditionalGeneration", "load_llava"]
