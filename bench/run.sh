#!/usr/bin/env bash
# The full benchmark suite on a GPU machine, then the plots and the markdown table.
#
#   bash bench/run.sh [extra pytest arguments, e.g. -k "L4096"]
#
# Appends rows to bench/results/{attention,e2e}.csv (one run id for the whole call), writes
# bench/results/latest.json (pytest-benchmark), bench/results/*.png and bench/results/summary.md
# (another directory with ABFT_BENCH_RESULTS).
# Environment: PYTHON (interpreter, default python), ABFT_BENCH_SIZES (gpu | quick | smoke),
# ABFT_BENCH_RUN_ID, ABFT_BENCH_COMMIT, and the filters described in docs/bench.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${ABFT_BENCH_RESULTS:-bench/results}
mkdir -p "$OUT"
export ABFT_BENCH_RUN_ID=${ABFT_BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-$$}
if [ -z "${ABFT_BENCH_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "run.sh: not a git checkout; set ABFT_BENCH_COMMIT=<commit> to label the rows" >&2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run.sh: no CUDA GPU here: nothing is recorded unless ABFT_BENCH_RECORD=1 (CPU figures are" \
       "not performance figures; the CPU smoke is 'make test')" >&2
fi
"$PY" -m pytest bench -q -rs -p no:cacheprovider --benchmark-only \
  --benchmark-json="$OUT/latest.json" --benchmark-columns=median,min,rounds \
  --benchmark-group-by=group --benchmark-sort=name "$@"
status=$?
"$PY" bench/plot.py --run "$ABFT_BENCH_RUN_ID"
"$PY" bench/table.py --run "$ABFT_BENCH_RUN_ID" --out "$OUT/summary.md"
exit $status
