#!/usr/bin/env bash
# Do defect masks help BGAD and CKAAD? Magnetic tile (MVTec layout with ground_truth
# masks), general setting, 10 labelled anomalies: trained with the labelled anomalies'
# masks (use_gt_masks=true, the default) against their image labels only
# (use_gt_masks=false: BGAD's "coarse" image-level masks, CKAAD's every-position term).
# Image AUROC and pixel AUROC on the held-out images (their masks are always used for the
# pixel metric). One JSON per method, condition and seed in $OUT.
#
# Usage: scripts/bench_masks.sh [preset]          (default quick)
# Env:   PY (python), SEEDS (default "0 1 2"), DATA (magnetic tile folder), OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${1:-quick}
SEEDS=${SEEDS:-0 1 2}
DATA=${DATA:-../shared/datasets/magnetic_tile}
OUT=${OUT:-bench_results/masks_$PRESET}
mkdir -p "$OUT"
for SEED in $SEEDS; do  # seed by seed, so a partial sweep still compares like with like
  for METHOD in bgad ckaad; do
    for MASKS in true false; do
      NAME="magnetic_tile_${METHOD}_masks-${MASKS}_seed${SEED}"
      [ -s "$OUT/$NAME.json" ] && continue
      "$PY" -m osad_core benchmark --data "$DATA" --methods "$METHOD" --setting general --shots 10 \
        --preset "$PRESET" --seeds "$SEED" --no-db --set "use_gt_masks=$MASKS" --json "$OUT/$NAME.json"
    done
  done
done
