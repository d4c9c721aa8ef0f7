#!/usr/bin/env bash
# Magnetic tile's hard setting (issue #17): 10 labelled anomalies of one defect type, tested on
# the other four types and the normals, each type seen in turn; one JSON per (method, type, seed).
# Usage: scripts/bench_mtile_hard.sh METHOD...          (ahl saliencycut dra devnet bgad ckaad fusion)
#   TYPES="blowhole crack" SEEDS="0" PRESET=quick scripts/bench_mtile_hard.sh bgad ckaad
#   SUFFIX=-ref_rotate EXTRA="--set ref_rotate=true" scripts/bench_mtile_hard.sh dra   (other settings)
# Finished runs (their JSON exists) are skipped, so an interrupted sweep resumes; stderr per run
# goes to $OUT/<name>.log. Tabulate with: python scripts/bench_table.py bench_results/mtile_hard
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
PY=${PY:-.venv/bin/python}
MT=${MAGNETIC_TILE:-../shared/datasets/magnetic_tile}
TYPES=${TYPES:-"blowhole break crack fray uneven"}
SEEDS=${SEEDS:-0}
PRESET=${PRESET:-quick}
OUT=${OUT:-bench_results/mtile_hard}
SUFFIX=${SUFFIX:-}  # added to the method's name in the file names
EXTRA=${EXTRA:-}    # more options of the benchmark command, e.g. --set key=value
mkdir -p "$OUT"
for method in "$@"; do
  for type in $TYPES; do
    for seed in $SEEDS; do
      name=${method}${SUFFIX}_${type}_s${seed}
      if [ -f "$OUT/$name.json" ]; then echo "== $name: done before"; continue; fi
      echo "== $name $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
      "$PY" -m osad_core benchmark --data "$MT" --setting hard --shots 10 --known-class "$type" \
        --methods "$method" --preset "$PRESET" --seeds "$seed" --no-db $EXTRA --json "$OUT/$name.json" \
        2> "$OUT/$name.log"
    done
  done
done
