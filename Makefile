# Developer entry points. `make demo` and `make test` set up .venv on first use.
# torch==2.13.0 is installed before the package: with no torch present, pip would resolve the
# package's looser `torch>=2.4` to a multi-GB CUDA build.

VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
LINT_PATHS := $(wildcard src tests experiments benchmarks)

.PHONY: venv demo test lint bench docs clean

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
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

# The docs extra is installed on first use; the build runs every example (small) for the gallery.
docs: venv
	$(PYTHON) -c "import mkdocs, material, mkdocstrings" 2>/dev/null || $(PIP) install -e '.[dev,experiments,docs]'
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
