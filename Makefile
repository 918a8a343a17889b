# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# TORCH is installed before the package so pip never pulls another build: override it for CUDA, e.g.
#   make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" demo
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,hf,lightning,ray
BIN := $(VENV)/bin
STAMP := $(VENV)/.stabilitylab-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast install bench gallery reproduce lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	# torch is named again so the resolver keeps that build instead of replacing it.
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	# mup declares torchvision, which would replace torch: install it without dependencies.
	$(BIN)/python -m pip install -q --no-deps "mup>=1.0" pyyaml
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stabilitylab demo --out runs/demo

# Fast suite first, then the long (`slow`) tests, which CI runs as well.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

reproduce: $(STAMP)
	$(BIN)/stabilitylab reproduce --scale quick

gallery: $(STAMP)
	$(BIN)/python scripts/make_gallery.py --out docs/gallery

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

lint: $(STAMP)
	$(BIN)/ruff check stabilitylab tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
