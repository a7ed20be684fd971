# Two doors: `make demo` runs the main job on embedded defaults, `make test` runs the suite.
# Both build the environment first (Python 3.11 venv in .venv, pinned by constraints.txt).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, timm, ray, openslide; print('environment ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__, 'openslide', openslide.__library_version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ccs demo

test: $(STAMP)
	$(BIN)/ruff check platform jobs tests bench serve research
	$(BIN)/ruff format --check platform jobs tests bench serve research
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check platform jobs tests bench serve research

format: $(STAMP)
	$(BIN)/ruff format platform jobs tests bench serve research
	$(BIN)/ruff check --fix platform jobs tests bench serve research

bench: $(STAMP)
	$(BIN)/python bench/read_stage.py
	$(BIN)/python bench/synth_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache ccs-data ccs-cohort bench/out
