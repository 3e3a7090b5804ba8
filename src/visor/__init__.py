"""VISOR: VISion On Request for LLaVA-OneVision-style vision-language models."""

__version__ = "0.1.0"
