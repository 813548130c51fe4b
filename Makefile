# Two commands on a fresh clone: `make quickstart` and `make test`.  Each first runs `setup`, which
# creates .venv and installs the package with its test extra, once: the stamp file is named after
# setup.py's hash, so the set-up runs again only when setup.py changes (or .venv is removed).
# `make notebooks` re-executes notebooks/*.ipynb and saves them with their outputs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SETUP_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('setup.py', 'rb').read()).hexdigest()[:16])")
STAMP := $(VENV)/.installed-$(SETUP_HASH)

.PHONY: setup quickstart test notebooks

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

quickstart: setup
	$(BIN)/infinity-lightning quickstart --out runs/quickstart

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

notebooks: setup
	$(BIN)/python scripts/execute_notebooks.py
