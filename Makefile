# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# TORCH is installed before the package so pip never pulls another build: override it for CUDA, e.g.
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,hf,lightning,ray
BIN := $(VENV)/bin
STAMP := $(VENV)/.stabilitylab-installed
PYTEST_ARGS ?=

.PHONY: demo test install bench gallery lint clean

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

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

lint: $(STAMP)
	$(BIN)/ruff check stabilitylab tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
