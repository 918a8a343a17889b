# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# They install exactly the versions CI tested, pinned in requirements/constraints.txt (pip-tools; refresh
# with `make lock`).
# TORCH is installed before the package so pip never pulls another build: override it for CUDA, e.g.
#   make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" demo
# (the lock pins torch without a local label, so any build of the locked version satisfies it).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,hf,lightning,ray,tensorboard,wandb-workspaces
BIN := $(VENV)/bin
STAMP := $(VENV)/.stabilitylab-installed
LOCK := requirements/constraints.txt
PYTEST_ARGS ?=
COMMA := ,
# `make test-latest`: the newest versions the pyproject ranges allow, in a separate venv.
VENV_LATEST ?= .venv-latest
# `make lock`: pip-tools lives in its own venv; LOCK_ARGS=--upgrade moves every pin to the newest allowed.
TOOLS_VENV ?= .venv-tools
LOCK_ARGS ?=

.PHONY: demo test test-fast test-latest install lock bench gallery reproduce lint clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH)
	# torch is named again so the resolver keeps that build instead of replacing it.
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]" $(TORCH)
	# mup declares torchvision, which would replace torch: install it without dependencies.
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps mup pyyaml
	$(BIN)/python scripts/lock_diff.py --strict --python $(BIN)/python --lock $(LOCK)
	touch $(STAMP)

install: $(STAMP)

# Re-resolve $(LOCK) from pyproject.toml's extras plus requirements/constraints.in. Existing pins are
# kept unless LOCK_ARGS=--upgrade (or --upgrade-package NAME); torch's local label (+cpu) is dropped.
lock: $(TOOLS_VENV)/bin/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS_VENV)/bin/pip-compile -q --strip-extras \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		--unsafe-package torchvision --unsafe-package seaborn \
		$(foreach e,$(subst $(COMMA), ,$(EXTRAS)),--extra $(e)) $(LOCK_ARGS) \
		--output-file $(LOCK) pyproject.toml requirements/constraints.in
	sed -i 's/^torch==\([^+ ]*\)+[^ ]*/torch==\1/' $(LOCK)
	sed -i '1i # What CI tests (Python 3.11, CPU torch). Refresh: `make lock`; newest allowed: `make lock LOCK_ARGS=--upgrade`.' $(LOCK)
	! grep -n -i -E '^(nvidia-|triton|cuda)' $(LOCK)

$(TOOLS_VENV)/bin/pip-compile:
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q "pip-tools>=7.4"

# Upstream drift: install the newest versions the ranges allow (torch stays $(TORCH)), show how they
# differ from the lock, then run the fast suite.
test-latest:
	test -x $(VENV_LATEST)/bin/python || $(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q $(TORCH)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]" $(TORCH)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade --no-deps mup pyyaml
	$(VENV_LATEST)/bin/python scripts/lock_diff.py --python $(VENV_LATEST)/bin/python --lock $(LOCK)
	$(VENV_LATEST)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

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
	# the layers of README "Architecture" (pyproject [tool.importlinter]); also run by tests/test_layers.py
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(VENV_LATEST) $(TOOLS_VENV) runs .pytest_cache
