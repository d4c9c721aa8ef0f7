#!/usr/bin/env bash
# SaliencyCut against DRA (issue #4): ELPV general 1/10 shots, ELPV hard (known class mono,
# then poly; 1/10 shots), HeadCT general 1/10 shots; plus SaliencyCut's pseudo anomalies refreshed
# once per epoch (the paper's variant; the default is every iteration, the official code's)
# and the anomaly-free setting.
# Every cell is mean ± std over the seeds, with training time; results go to $OUT as JSON and text.
#
#   scripts/bench_saliencycut.sh                          # quick preset, seeds 0 1 2
#   PRESET=paper EXTRA="--device cuda" scripts/bench_saliencycut.sh
#   ONLY=headct scripts/bench_saliencycut.sh              # only the runs whose name contains "headct"
#   PART=quick14 SEEDS=0 scripts/bench_saliencycut.sh     # only issue #17's runs (below)
#
# The CLI records every run in the OSAD Studio database unless EXTRA contains --no-db.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PRESET=${PRESET:-quick}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-bench_results/saliencycut_${PRESET}}
EXTRA=${EXTRA:-}
ONLY=${ONLY:-}
mkdir -p "$OUT"

PART=${PART:-}

# P=<preset> run ...: one run at another preset than $PRESET
run() {
  local name=$1
  shift
  if [[ -n "$ONLY" && "$name" != *"$ONLY"* ]]; then return 0; fi
  echo "== $name: $*"
  # shellcheck disable=SC2086
  "$PY" -m osad_core benchmark "$@" --preset "${P:-$PRESET}" --seeds $SEEDS $EXTRA --json "$OUT/$name.json" \
    | tee "$OUT/$name.txt"
}

if [[ "$PART" == quick14 ]]; then
  # Issue #17: SaliencyCut's quick14 preset (224 px, stride-16 trunk: a 14×14 map for the patch
  # residual) against quick (160 px, 5×5) and DRA quick, all at the same steps (10 epochs × 10 × 32);
  # DRA with its references rotated with every training batch (ref_rotate, the official code's).
  for d in "elpv hard 10" "headct general 10" "elpv general 10" "elpv general 1"; do
    set -- $d
    P=quick14 run "${1}_${2}_${3}_saliencycut-quick14" --data "$1" --methods saliencycut --setting "$2" --shots "$3"
    P=quick run "${1}_${2}_${3}_saliencycut-quick" --data "$1" --methods saliencycut --setting "$2" --shots "$3"
    P=quick run "${1}_${2}_${3}_dra-quick" --data "$1" --methods dra --setting "$2" --shots "$3"
    P=quick run "${1}_${2}_${3}_dra-ref_rotate" --data "$1" --methods dra --setting "$2" --shots "$3" \
      --set ref_rotate=true
  done
  "$PY" scripts/bench_table.py "$OUT"
  exit 0
fi

for shots in 1 10; do
  run "elpv_general_${shots}" --data elpv --methods saliencycut,dra --setting general --shots "$shots"
  # hard without --known-class: one row per known class (mono, poly) plus their mean below
  run "elpv_hard_${shots}" --data elpv --methods saliencycut,dra --setting hard --shots "$shots"
  run "headct_general_${shots}" --data headct --methods saliencycut,dra --setting general --shots "$shots"
done

# pseudo anomalies refreshed once per epoch (paper) instead of every iteration (official code)
run "elpv_general_10_refresh_epoch" --data elpv --methods saliencycut --setting general --shots 10 \
  --set pseudo_refresh=epoch
run "elpv_hard_10_refresh_epoch" --data elpv --methods saliencycut --setting hard --shots 10 \
  --set pseudo_refresh=epoch
run "headct_general_10_refresh_epoch" --data headct --methods saliencycut --setting general --shots 10 \
  --set pseudo_refresh=epoch

# anomaly-free setting (no labelled anomalies; SaliencyCut's own pseudo anomalies only)
run "elpv_general_0" --data elpv --methods saliencycut --setting general --shots 0
run "headct_general_0" --data headct --methods saliencycut --setting general --shots 0

# one table over everything written above (hard: also the mean over the known classes)
"$PY" scripts/bench_table.py "$OUT"
