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
# Stages, each under its own time limit (seconds, env), the decisive numbers first:
#   1. versions and the GPU (DIR/env.txt);
#   2. the CUDA C++ extension is built in the background (DIR/cuda_build.log, T_BUILD);
#   3. the decisive numbers (T_DECISIVE): fwd+bwd at the quick shapes (L 4k and 16k, padded,
#      windowed) of abft auto / sdpa / varlen / triton, with and without probes, beside every
#      SDPA backend and FlexAttention without probes, and the ABFT step on a padded batch
#      (Llama-1B shape, B 8, L 1k): bench/run.sh -k "$DECISIVE" into DIR/decisive;
#   3b. the same for abft_triton with ABFT_FAST_TMA=1 ABFT_FAST_AUTOTUNE=1 (T_VARIANT, into
#      DIR/decisive-tma-tune; its rows carry flags "ABFT_FAST_TMA=1 ABFT_FAST_AUTOTUNE=1");
#   4. Triton compiled on the GPU: tests/ops/test_triton_backend.py, test_sdpa_backend.py,
#      test_triton_backward.py, test_autotune.py, test_host_sync.py, test_dispatch.py,
#      test_fuzz.py, test_validation.py, test_varlen.py (the vendor varlen kernel),
#      tests/hf/test_hf.py, FSDP2 at world size 1 on NCCL (DIR/test_triton.log, T_TRITON);
#   5. the CUDA C++ backend: pytest -m gpu tests/ops/test_cuda_backend.py (DIR/test_cuda.log,
#      T_CUDA);
#   6. bench/tune_tiles.py: Triton tile configurations at the quick shape (DIR/tiles.csv and
#      DIR/tiles.log, T_TUNE);
#   7. the rest of the quick benchmark (T_BENCH) into DIR/bench;
#   8. QLoRA (issue 28; only when a bitsandbytes wheel is in $WHEELS, default build/wheels, carried
#      to the machine, as its image has none): one ABFT step on the Llama-8B shape at L 4k, NF4 +
#      LoRA beside bf16 full q/k, peak memory and tokens/s (scripts/qlora_step.py, T_QLORA) into
#      DIR/qlora_step.csv. About 4 minutes: run it as its own call, SKIP="decisive triton cuda
#      tune bench". The wheels (bitsandbytes 43 MB; peft, pure Python, in case the image lacks
#      it): `pip download --no-deps -d build/wheels bitsandbytes==0.50.2 peft==0.21.2` here, then
#      carry build/wheels; every wheel there is installed with --no-deps.
# Every benchmark directory is packed as DIR/<name>.tgz.
# SKIP="cuda tune" (any of decisive, triton, cuda, tune, bench, qlora) leaves stages out; 8 files at most
# come back. The last lines printed are the pytest summaries and the benchmark tables.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export ABFT_FAST_CUDA_BUILD_DIR=${ABFT_FAST_CUDA_BUILD_DIR:-/tmp/abft_fast_cuda_ext} MAX_JOBS=${MAX_JOBS:-16}
# defaults sum to about 9 minutes, under one device call's 10 (the build overlaps stage 3)
T_BUILD=${T_BUILD:-180} T_DECISIVE=${T_DECISIVE:-180} T_VARIANT=${T_VARIANT:-60}
T_TRITON=${T_TRITON:-120} T_CUDA=${T_CUDA:-60} T_TUNE=${T_TUNE:-60} T_BENCH=${T_BENCH:-60}
T_QLORA=${T_QLORA:-270} WHEELS=${WHEELS:-build/wheels}
DECISIVE=${DECISIVE:-"(both and (abft_auto or abft_sdpa or abft_varlen or abft_triton or sdpa_cudnn or sdpa_flash or sdpa_efficient or flex)) or (padded and (abft_auto or abft_varlen or abft_triton or sdpa_recompute))"}
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
    timeout "$T_BUILD" "$PY" -c "from abft_fast.ops.cuda_ext import load_extension; load_extension()"
    echo "build exit $? after $((SECONDS - s)) s"
  ) >"$OUT/cuda_build.log" 2>&1 &
  build_pid=$!
fi

bench_stage() {  # name, time limit, pytest -k filter ("" = all); env passes through
  ABFT_BENCH_SIZES=quick ABFT_BENCH_RESULTS="$OUT/$1" PYTHON="$PY" \
    timeout "$2" bash bench/run.sh ${3:+-k "$3"} >"$OUT/$1.log" 2>&1
  echo "bench exit $?" >>"$OUT/$1.log"
  tar -czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"
}

if want decisive; then
  stamp "3. decisive numbers (fwd+bwd: abft auto / sdpa / triton vs SDPA backends and Flex)"
  bench_stage decisive "$T_DECISIVE" "$DECISIVE"
  stamp "3b. abft_triton with ABFT_FAST_TMA=1 ABFT_FAST_AUTOTUNE=1"
  ABFT_FAST_TMA=1 ABFT_FAST_AUTOTUNE=1 bench_stage decisive-tma-tune "$T_VARIANT" \
    "both and abft_triton"
fi

if want triton; then
  stamp "4. Triton on the GPU"
  timeout "$T_TRITON" "$PY" -m pytest -v -p no:cacheprovider -rfEs "${PAR[@]}" \
    tests/ops/test_triton_backend.py tests/ops/test_sdpa_backend.py \
    tests/ops/test_triton_backward.py tests/ops/test_autotune.py tests/ops/test_host_sync.py \
    tests/ops/test_dispatch.py tests/ops/test_fuzz.py tests/ops/test_validation.py \
    tests/ops/test_varlen.py tests/hf/test_hf.py \
    tests/hf/test_fsdp.py::test_fsdp2_world_size_one_on_a_gpu >"$OUT/test_triton.log" 2>&1
  echo "pytest exit $?" >>"$OUT/test_triton.log"
fi

if want cuda; then
  stamp "5. CUDA C++ backend (waiting for the build)"
  wait "$build_pid"
  tail -5 "$OUT/cuda_build.log"
  timeout "$T_CUDA" "$PY" -m pytest -v -p no:cacheprovider -rfEs "${PAR[@]}" -m gpu \
    tests/ops/test_cuda_backend.py >"$OUT/test_cuda.log" 2>&1
  echo "pytest exit $?" >>"$OUT/test_cuda.log"
fi

if want tune; then
  stamp "6. Triton tile configurations (bench/tune_tiles.py)"
  timeout "$T_TUNE" "$PY" bench/tune_tiles.py --out "$OUT/tiles.csv" >"$OUT/tiles.log" 2>&1
  echo "tune exit $?" >>"$OUT/tiles.log"
fi

if want bench; then
  stamp "7. the rest of the quick benchmark"
  bench_stage bench "$T_BENCH" "${DECISIVE:+not (${DECISIVE})}"
fi

if want qlora && ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1; then
  stamp "8. QLoRA: one ABFT step, Llama-8B shape, L 4k (NF4 + LoRA vs bf16 full q/k)"
  {
    "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
    timeout "$T_QLORA" "$PY" scripts/qlora_step.py --shape llama-8b --length 4096 \
      --csv "$OUT/qlora_step.csv"
    echo "qlora exit $?"
  } >"$OUT/qlora_step.log" 2>&1
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
if [ -f "$OUT/qlora_step.log" ]; then echo "== qlora"; grep -E "^\{|exit|Error" "$OUT/qlora_step.log" | tail -6; fi
for b in decisive decisive-tma-tune bench; do
  [ -f "$OUT/$b.log" ] || continue
  echo "== $b"; grep -E "passed|failed|error|exit" "$OUT/$b.log" | tail -5
  tar -xzOf "$OUT/$b.tgz" "$b/summary.md" 2>/dev/null | head -60
done
