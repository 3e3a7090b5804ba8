"""VISOR: VISion On Request for LLaVA-OneVision-style vision-language models."""

from visor.config import VisorConfig
from visor.modeling import VisorForConditionalGeneration

__all__ = ["VisorConfig", "VisorForConditionalGeneration"]
__version__ = "0.1.0"
