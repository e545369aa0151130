# Two entry points: `make demo` (set up, then the main job) and `make test` (set up, then the tests).
# Set-up creates .venv, installs torch==2.13.0 first unless the venv already has a torch (an
# unpinned torch would pull a multi-GB CUDA build), then this package with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/digits

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/cvt summary cvt-13
	$(BIN)/python examples/classify_generated_image.py

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup  # exit status 5 means no test is marked slow: nothing to run is not a failure
	$(BIN)/python -m pytest -q -m slow || test $$? -eq 5

clean:
	rm -rf $(VENV) runs build *.egg-info
