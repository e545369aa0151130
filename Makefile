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

# The main job, offline: train cvt-tiny on scikit-learn's digits, evaluate it on the held-out split,
# classify a few held-out digits saved as PNG files, and point at the learning curves.
demo: setup
	$(BIN)/cvt train --output $(RUN) --overwrite  # the demo's own folder: each `make demo` starts it over
	$(BIN)/cvt eval --weights $(RUN) --data digits --save-images 8
	$(BIN)/cvt predict --weights $(RUN) --top-k 3 $(RUN)/images
	@echo "learning curves: $(RUN)/learning_curves.png   confusion matrix: $(RUN)/confusion_matrix.png"

test: setup
	$(BIN)/python -m pytest -q -n 2

test-slow: setup  # exit status 5 means no test is marked slow: nothing to run is not a failure
	$(BIN)/python -m pytest -q -n 2 -m slow || test $$? -eq 5

clean:
	rm -rf $(VENV) runs build *.egg-info
