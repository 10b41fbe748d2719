#!/usr/bin/env bash
# One call on a CUDA machine: GPU correctness of every kernel path, then the quick benchmark.
#
#   OUT=DIR bash scripts/gpu_check.sh
#
# Uses the machine's own python3 (torch, triton, transformers already there) and installs only the
# checkout into it: `pip install --no-deps --no-index --no-build-isolation --use-pep517 -e .`
# (abft_fast.kernels is mapped from kernels/ by setup.py, so PYTHONPATH alone is not enough;
# without --use-pep517 an older pip takes the legacy `setup.py develop` path, which tries to download
# setuptools on an offline machine). If that install fails, kernels/ is linked as abft_fast/kernels.
# Each Triton test case compiles its own kernel specialisations (about 18 s per case on the H100
# with one process, 2026-11-27), so the tests run under pytest-xdist (-n $XDIST, default 8) where
# it is installed.
# Stages, each under its own time limit (seconds, env):
#   1. versions and the GPU (DIR/env.txt);
#   2. the CUDA C++ extension is built in the background (DIR/cuda_build.log, T_BUILD);
#   3. Triton compiled on the GPU: tests/ops/test_triton_backend.py, test_sdpa_backend.py,
#      test_host_sync.py, test_dispatch.py, test_fuzz.py, test_validation.py, tests/hf/test_hf.py
#      (DIR/test_triton.log, T_TRITON);
#   4. the CUDA C++ backend: pytest -m gpu tests/ops/test_cuda_backend.py (DIR/test_cuda.log,
#      T_CUDA);
#   5. bench/tune_tiles.py: Triton tile configurations at the quick shape (DIR/tiles.csv and
#      DIR/tiles.log, T_TUNE);
#   6. ABFT_BENCH_SIZES=quick bash bench/run.sh into DIR/bench (T_BENCH), packed as DIR/bench.tgz.
# SKIP="cuda tune" (any of triton, cuda, tune, bench) leaves stages out; 8 files at most come back.
# The last lines printed are the pytest summaries and the benchmark table.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export ABFT_FAST_CUDA_BUILD_DIR=${ABFT_FAST_CUDA_BUILD_DIR:-/tmp/abft_fast_cuda_ext} MAX_JOBS=${MAX_JOBS:-16}
# defaults sum to about 9 minutes, under one device call's 10 (the build overlaps stage 3)
T_BUILD=${T_BUILD:-180} T_TRITON=${T_TRITON:-200} T_CUDA=${T_CUDA:-90} T_TUNE=${T_TUNE:-120}
T_BENCH=${T_BENCH:-120}
# shorter timing budgets than bench/run.sh's defaults, so that the quick grid fits one call
export ABFT_BENCH_SECONDS=${ABFT_BENCH_SECONDS:-0.5} ABFT_BENCH_E2E_SECONDS=${ABFT_BENCH_E2E_SECONDS:-2}
PAR=()
if "$PY" -c "import xdist" 2>/dev/null && [ "${XDIST:-8}" != 0 ]; then PAR=(-n "${XDIST:-8}"); fi
t0=$SECONDS
stamp() { echo "[gpu_check +$((SECONDS - t0))s] $*"; }

stamp "1. environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__);
p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs')"
  command -v nvcc && nvcc --version | tail -1
  if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e .; then
    echo "abft_fast installed (editable)"
  else
    ln -sfn ../kernels abft_fast/kernels && echo "pip install failed: kernels/ linked as abft_fast/kernels"
  fi
  "$PY" -c "import abft_fast.kernels.attention" && echo "abft_fast.kernels imports"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

want() { [[ " ${SKIP:-} " != *" $1 "* ]]; }  # SKIP="cuda bench" leaves those stages out

build_pid=
if want cuda; then
  stamp "2. CUDA extension build (background)"
  (
    s=$SECONDS
    timeout "$T_BUILD" "$PY" -c "from abft_fast.ops.cuda_backend import load_extension; load_extension()"
    echo "build exit $? after $((SECONDS - s)) s"
  ) >"$OUT/cuda_build.log" 2>&1 &
  build_pid=$!
fi

if want triton; then
  stamp "3. Triton on the GPU"
  timeout "$T_TRITON" "$PY" -m pytest -v -p no:cacheprovider -rfEs "${PAR[@]}" \
    tests/ops/test_triton_backend.py tests/ops/test_sdpa_backend.py tests/ops/test_host_sync.py \
    tests/ops/test_dispatch.py tests/ops/test_fuzz.py tests/ops/test_validation.py \
    tests/hf/test_hf.py >"$OUT/test_triton.log" 2>&1
  echo "pytest exit $?" >>"$OUT/test_triton.log"
fi

if want cuda; then
  stamp "4. CUDA C++ backend (waiting for the build)"
  wait "$build_pid"
  tail -5 "$OUT/cuda_build.log"
  timeout "$T_CUDA" "$PY" -m pytest -v -p no:cacheprovider -rfEs "${PAR[@]}" -m gpu \
    tests/ops/test_cuda_backend.py >"$OUT/test_cuda.log" 2>&1
  echo "pytest exit $?" >>"$OUT/test_cuda.log"
fi

if want tune; then
  stamp "5. Triton tile configurations (bench/tune_tiles.py)"
  timeout "$T_TUNE" "$PY" bench/tune_tiles.py --out "$OUT/tiles.csv" >"$OUT/tiles.log" 2>&1
  echo "tune exit $?" >>"$OUT/tiles.log"
fi

if want bench; then
  stamp "6. quick benchmark"
  ABFT_BENCH_SIZES=quick ABFT_BENCH_RESULTS="$OUT/bench" PYTHON="$PY" \
    timeout "$T_BENCH" bash bench/run.sh >"$OUT/bench.log" 2>&1
  echo "bench exit $?" >>"$OUT/bench.log"
  tar -czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
fi

stamp "done"
# per-test lines (-v) survive a time-out, when pytest prints no summary
for f in test_triton test_cuda; do
  [ -f "$OUT/$f.log" ] || continue
  echo "== $f: $(grep -c " PASSED" "$OUT/$f.log") passed, $(grep -c " FAILED" "$OUT/$f.log") failed," \
       "$(grep -c " SKIPPED" "$OUT/$f.log") skipped, $(grep -c " ERROR" "$OUT/$f.log") errors"
  grep -E "^(FAILED|ERROR)|(passed|failed).* in |exit" "$OUT/$f.log" | tail -25
done
if [ -f "$OUT/tiles.log" ]; then echo "== tiles"; tail -20 "$OUT/tiles.log"; fi
if [ -f "$OUT/bench.log" ]; then
  echo "== bench"; grep -E "passed|failed|error|exit" "$OUT/bench.log" | tail -5
  tar -xzOf "$OUT/bench.tgz" bench/summary.md 2>/dev/null | head -60
fi
