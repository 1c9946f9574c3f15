# Two entry points (see README): `make demo` and `make test`. Both create the virtual
# environment on first use (.venv, Python 3.11) and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUTPUT ?= output/demo

.PHONY: venv demo test unit lint clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# detectron2: the sal-detectron2 wheel is tagged cp310 but is pure Python plus an optional
	# _C extension; install it for 3.10 into this venv's site-packages (why: docs/INSTALL.md).
	$(PY) -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
	    --upgrade --target "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	    sal-detectron2==0.7.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# a second `make demo` into the same OUTPUT stops with a message: pass DEMO_ARGS=--resume
# (continue that run) or DEMO_ARGS=--overwrite (train again), or another OUTPUT=...
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) tools/demo.py --output $(OUTPUT) $(DEMO_ARGS)

# lint first (seconds): ruff and the import contracts of pyproject.toml, then every test
test: $(STAMP) lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

# the unit tests only (about a minute): end-to-end runs are marked slow
unit: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

clean:
	rm -rf $(VENV) output datasets
