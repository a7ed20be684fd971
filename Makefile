# Two doors: `make demo` runs the main job on embedded defaults, `make test` runs the suite.
# Both build the environment first (Python 3.11 venv in .venv, pinned by constraints.txt).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VIEWER := viewer/node_modules/.installed
BROWSER := /usr/bin/chromedriver
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: demo test lint format bench env clean

env: $(STAMP) $(VIEWER)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, timm, ray, openslide; print('environment ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__, 'openslide', openslide.__library_version__)"
	touch $(STAMP)

# The review workstation's viewer (OpenSeadragon) from the npm registry, never committed.
$(VIEWER): viewer/package.json viewer/package-lock.json
	command -v npm >/dev/null || ($(APT) update -qq && $(APT) install -y -qq nodejs npm)
	cd viewer && npm ci --no-audit --no-fund --loglevel=error
	touch $(VIEWER)

# Debian's Chromium and its driver, for the browser test of the review workstation.
$(BROWSER):
	$(APT) update -qq && $(APT) install -y -qq chromium chromium-driver

demo: $(STAMP) $(VIEWER)
	$(BIN)/ccs demo

test: $(STAMP) $(VIEWER) $(BROWSER)
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
	rm -rf $(VENV) viewer/node_modules .pytest_cache .ruff_cache ccs-data ccs-cohort bench/out
