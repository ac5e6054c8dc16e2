# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
# Both set up .venv on first use. On a CPU-only machine the pinned CPU torch wheel is installed;
# on a GPU machine install your CUDA torch into .venv first (README, "Installing") and it is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps torchvision==$(TORCHVISION_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/dopd-vlm demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .cache
