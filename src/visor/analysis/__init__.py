"""Where does a full LVLM need vision? Attention share, image-token drift (CKA), layer sensitivity, and a
measured CA/SA placement for VISOR (the paper's Section 3 analyses). See `run.analyze` for the outputs."""

from visor.analysis.cka import cka_matrix, linear_cka
from visor.analysis.probe import probe
from visor.analysis.run import AnalysisPlan, analyze

__all__ = ["AnalysisPlan", "probe", "analyze", "cka_matrix", "linear_cka"]
