"""VISOR: VISion On Request for vision-language models (LLaVA-OneVision today; see `visor.backbones`)."""

from visor.backbones.llava_onevision import VisorConfig, VisorForConditionalGeneration

__all__ = ["VisorConfig", "VisorForConditionalGeneration"]
__version__ = "0.1.0"
