"""Training recipes on accelerate: the full model, VISOR stage 1, universal training, configuration search.

    from visor.training import TrainingSettings, train
    train("full", "synthetic", "runs/full", TrainingSettings(max_steps=2000), model_preset="tiny")

`visor train …` and `visor configurations search …` (see `cli.py`) are thin wrappers over these functions.
"""

from visor.training.engine import Trainer, train
from visor.training.recipes import RECIPES
from visor.training.settings import TrainingSettings, load_settings

__all__ = ["RECIPES", "Trainer", "TrainingSettings", "load_settings", "train"]
