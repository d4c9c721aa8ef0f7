#!/usr/bin/env bash
# AHL(DRA) and AHL(DevNet) against their base models (issue #3), 3 seeds each:
#   ELPV general 1 / 10 shots, ELPV hard (seen class mono, and poly) 1 / 10 shots,
#   HeadCT general 1 / 10 shots.
# Each AHL run also scores the test set with its stage-A base model (same backbone, image size,
# seed and features), so one run gives both numbers: "its base" lines in the table.
#
#   scripts/bench_ahl.sh            # paper preset (448 px, the published schedules): a GPU job
#   PRESET=quick scripts/bench_ahl.sh
#   SEEDS="0" PRESET=tiny ONLY=headct_general_10 OUT=/tmp/ahl_smoke scripts/bench_ahl.sh  # smoke test
# ONLY: a regular expression; only runs whose name (e.g. elpv_hard_10_ahl-devnet) matches it.
#
# One JSON per (data, setting, shots, method) in $OUT (finished ones are skipped on re-run),
# stderr per run in $OUT/*.log (AHL's per-stage times are logged there), then a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${PRESET:-paper}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-bench_results/ahl_$PRESET}
ONLY=${ONLY:-.}
mkdir -p "$OUT"

run() {  # run NAME ARGS...: one benchmark command unless its JSON exists
  local name=$1; shift
  [[ $name =~ $ONLY ]] || return 0
  if [ -f "$OUT/$name.json" ]; then echo "== $name: done before"; return; fi
  echo "== $name"
  # shellcheck disable=SC2086
  $PY -m osad_core -v benchmark --preset "$PRESET" --seeds $SEEDS --no-db --json "$OUT/$name.json" "$@" \
    2> "$OUT/$name.log" | grep -v '^$' || { echo "failed: see $OUT/$name.log"; exit 1; }
}

for shots in 1 10; do
  for grid in "elpv general" "elpv hard" "headct general"; do
    set -- $grid
    data=$1 setting=$2   # hard without --known-class: one row per seen class (mono, poly)
    tag="${data}_${setting}_${shots}"
    run "${tag}_ahl-dra"    --data "$data" --setting "$setting" --shots "$shots" --methods ahl --set base=dra
    run "${tag}_ahl-devnet" --data "$data" --setting "$setting" --shots "$shots" --methods ahl --set base=devnet
  done
done

grep -ho "ahl(.*) stage times: .*" "$OUT"/*.log | sort | uniq -c || true   # seconds per AHL stage
"$PY" scripts/bench_table.py "$OUT"
