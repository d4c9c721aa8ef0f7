#!/usr/bin/env bash
# Is the quick preset close to the full training budget? DRA on HeadCT, general setting,
# 10 shots, same backbone and image size (160 px, the quick preset's); full = the papers'
# schedule (30 epochs x 20 steps x batch 48, nothing frozen, StepLR every 10 epochs).
# One JSON per seed and budget in $OUT, then one table.
#
#   scripts/bench_quick_vs_full.sh                 # seeds 0 1 2 (full: about 45 min a seed, one CPU thread)
#   SEEDS="0" EXTRA="--device cuda" scripts/bench_quick_vs_full.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-bench_results/quick_vs_full}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
for seed in $SEEDS; do
  for budget in quick full160; do
    f="$OUT/headct_general_10_dra-$budget-s$seed.json"
    [ -f "$f" ] && continue
    case $budget in
      quick) args="--preset quick" ;;
      full160) args="--preset paper --image-size 160" ;;
    esac
    # shellcheck disable=SC2086
    $PY -m osad_core benchmark --data headct --methods dra --setting general --shots 10 --seeds "$seed" \
      $args $EXTRA --no-db --json "$f"
  done
done
"$PY" scripts/bench_table.py "$OUT"
