#!/usr/bin/env bash
# Is the quick preset close to the full training budget? DRA on HeadCT, general setting,
# 10 shots, same backbone and image size (224 px); full = the papers' schedule
# (30 epochs x 20 steps x batch 48, nothing frozen, StepLR every 10 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
$PY -m osad_core benchmark --data headct --methods dra --setting general --shots 10 --seeds $SEEDS \
  --preset quick --no-db --json bench_results/quick_headct_dra.json
$PY -m osad_core benchmark --data headct --methods dra --setting general --shots 10 --seeds $SEEDS \
  --preset paper --image-size 224 --no-db --json bench_results/full224_headct_dra.json
