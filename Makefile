# Developer entry points. `make demo` and `make test` set up .venv on first use.
# torch==2.13.0 is installed before the package: with no torch present, pip would resolve the
# package's looser `torch>=2.4` to a multi-GB CUDA build.

VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
LINT_PATHS := $(wildcard src tests experiments benchmarks)
BENCHES := $(sort $(wildcard benchmarks/*.py))

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev,experiments]'
	touch $@

demo: venv
	$(VENV)/bin/moreaugrad demo --out runs/demo

test: venv
	$(PYTHON) -m pytest

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)

bench: venv
ifeq ($(BENCHES),)
	@echo "bench: no benchmarks/*.py yet"
else
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(PYTHON) $$b; done
endif

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
