#!/usr/bin/env bash
# Whole quick runs side by side (issue #17's CPU budget: about twice one quick run of a paper
# method): quick DRA, Fusion with one head and Fusion with 8 head members (4 kept), one after
# another on the same CPU, each under /usr/bin/time with the load average before and after.
# Usage: scripts/bench_fusion_cost.sh            (DATA="headct elpv" SEED=0 OUT=bench_results/fusion_cost)
#        (the *-nocache runs: the frozen-feature cache off, as before it existed)
#        RUNS="dra fusion-default fusion-recon" scripts/bench_fusion_cost.sh   (names from the table below)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
PY=${PY:-.venv/bin/python}
DATA=${DATA:-"headct elpv"}
SEED=${SEED:-0}
OUT=${OUT:-bench_results/fusion_cost}
mkdir -p "$OUT"
for data in $DATA; do
  # name|method|settings: the settings are spelled out, so the rows do not move with the defaults
  for name in ${RUNS:-dra fusion fusion-keep8}; do
    case "$name" in
      dra) method=dra extra="" ;;
      fusion) method=fusion extra="--set head_members=1 --set head_keep=1.0" ;;
      fusion-keep8) method=fusion extra="--set head_members=8 --set head_keep=0.5" ;;
      fusion-m4k2) method=fusion extra="--set head_members=4 --set head_keep=0.5 --set recon_weight=0" ;;
      fusion-recon) method=fusion extra="--set head_members=4 --set head_keep=0.5 --set recon_weight=0.333333" ;;
      fusion-default) method=fusion extra="" ;;  # whatever the code's defaults are
      fusion-recon-nocache) method=fusion extra="--set recon_feature_cache_mb=0" ;;  # features per draw
      ckaad) method=ckaad extra="" ;;
      ckaad-nocache) method=ckaad extra="--set feature_cache_mb=0" ;;
      *) echo "unknown run $name" >&2; exit 2 ;;
    esac
    echo "$(date -u +%T) start $data $name load: $(cut -d' ' -f1-3 /proc/loadavg)"
    # shellcheck disable=SC2086  # $extra is a list of options
    /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KB max" nice -n 5 "$PY" -m osad_core benchmark \
      --data "$data" --shots 10 --methods "$method" --preset quick --seeds "$SEED" --no-db $extra \
      --json "$OUT/${data}_general_10_${name}_seed${SEED}.json" 2>&1 | grep -v '^\s*$' | tail -4
    echo "$(date -u +%T) end $data $name load: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
