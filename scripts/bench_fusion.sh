#!/usr/bin/env bash
# Fusion against the other detectors: every cell of the Measured-so-far table plus magnetic tile.
# Usage: scripts/bench_fusion.sh CELL...   (cells: headct10 headct1 elpv10 elpv1 elpvhard_mono elpvhard_poly mtile10 mtile10_bgad)
# BACKBONE=efficientnet_lite2 (or _lite1) runs Fusion on that backbone into bench_results/fusion_backbones/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OUT=bench_results/fusion_quick
EXTRA=()
SUFFIX=
if [ -n "${BACKBONE:-}" ]; then
  OUT=bench_results/fusion_backbones EXTRA=(--backbone "$BACKBONE") SUFFIX=_${BACKBONE#efficientnet_}
fi
MT=${MAGNETIC_TILE:-../shared/datasets/magnetic_tile}
HEADCT=${HEADCT:-../shared/datasets/headct}
mkdir -p "$OUT"
run() {  # name data setting shots method [extra args]
  local name=$1 data=$2 setting=$3 shots=$4 method=$5; shift 5
  .venv/bin/python -m osad_core benchmark --data "$data" --setting "$setting" --shots "$shots" --methods "$method" \
    --preset quick --seeds 0 1 2 --no-db --json "$OUT/$name$SUFFIX.json" "${EXTRA[@]}" "$@"
}
for cell in "$@"; do
  case $cell in
    headct10) run headct_general_10_fusion "$HEADCT" general 10 fusion ;;
    headct1) run headct_general_1_fusion "$HEADCT" general 1 fusion ;;
    elpv10) run elpv_general_10_fusion elpv general 10 fusion ;;
    elpv1) run elpv_general_1_fusion elpv general 1 fusion ;;
    elpvhard_mono) run elpv_hard_10_mono_fusion elpv hard 10 fusion --known-class mono ;;
    elpvhard_poly) run elpv_hard_10_poly_fusion elpv hard 10 fusion --known-class poly ;;
    mtile10) run magnetic_tile_general_10_fusion "$MT" general 10 fusion ;;
    mtile10_bgad) run magnetic_tile_general_10_bgad "$MT" general 10 bgad ;;
    *) echo "unknown cell $cell" >&2; exit 2 ;;
  esac
done
