# Two entry points: `make demo` and `make test`. Both create .venv and install what is
# missing first; nothing needs to be installed beforehand but Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(ACCEL)

.PHONY: install demo test tables

install: $(STAMP)

$(STAMP): requirements/$(ACCEL).txt requirements/common.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: Python 3.11 or newer is required ($(PYTHON))" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements/$(ACCEL).txt
	$(BIN)/python -m pip install --quiet -r requirements/common.txt
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(BIN)/morec-rec demo --out runs/demo

test: install
	$(BIN)/python -m pytest

# Regenerates every table under experiments/ from the committed results.json files.
tables:
	@test -x $(BIN)/python || $(MAKE) install
	$(BIN)/python experiments/tables.py
