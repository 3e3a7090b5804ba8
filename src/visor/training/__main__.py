"""`python -m visor.training train …` (also what `accelerate launch -m visor.training` runs)."""

from visor.training.cli import main

raise SystemExit(main())
