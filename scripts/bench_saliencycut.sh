#!/usr/bin/env bash
# SaliencyCut against DRA (issue #4): ELPV general 1/10 shots, ELPV hard (known class mono,
# then poly; 1/10 shots), HeadCT general 1/10 shots; plus SaliencyCut's per-epoch pseudo-anomaly
# refresh every iteration (the official code's variant; the default is per epoch, the paper's)
# and the anomaly-free setting.
# Every cell is mean ± std over the seeds, with training time; results go to $OUT as JSON and text.
#
#   scripts/bench_saliencycut.sh                          # quick preset, seeds 0 1 2
#   PRESET=paper EXTRA="--device cuda" scripts/bench_saliencycut.sh
#   ONLY=headct scripts/bench_saliencycut.sh              # only the runs whose name contains "headct"
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

run() {
  local name=$1
  shift
  if [[ -n "$ONLY" && "$name" != *"$ONLY"* ]]; then return 0; fi
  echo "== $name: $*"
  # shellcheck disable=SC2086
  "$PY" -m osad_core benchmark "$@" --preset "$PRESET" --seeds $SEEDS $EXTRA --json "$OUT/$name.json" \
    | tee "$OUT/$name.txt"
}

for shots in 1 10; do
  run "elpv_general_${shots}" --data elpv --methods saliencycut,dra --setting general --shots "$shots"
  # hard without --known-class: one row per known class (mono, poly) plus their mean below
  run "elpv_hard_${shots}" --data elpv --methods saliencycut,dra --setting hard --shots "$shots"
  run "headct_general_${shots}" --data headct --methods saliencycut,dra --setting general --shots "$shots"
done

# pseudo anomalies refreshed every iteration (official code) instead of once per epoch (paper)
run "elpv_general_10_refresh_iteration" --data elpv --methods saliencycut --setting general --shots 10 \
  --set pseudo_refresh=iteration
run "elpv_hard_10_refresh_iteration" --data elpv --methods saliencycut --setting hard --shots 10 \
  --set pseudo_refresh=iteration
run "headct_general_10_refresh_iteration" --data headct --methods saliencycut --setting general --shots 10 \
  --set pseudo_refresh=iteration

# anomaly-free setting (no labelled anomalies; SaliencyCut's own pseudo anomalies only)
run "elpv_general_0" --data elpv --methods saliencycut --setting general --shots 0
run "headct_general_0" --data headct --methods saliencycut --setting general --shots 0

# one table over everything written above (hard: also the mean over the known classes)
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

import numpy as np

rows = []
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    for r in json.loads(f.read_text())["rows"]:
        r["variant"] = "refresh=iteration" if "refresh_iteration" in f.stem else ""
        rows.append(r)
print(f"\n{'method':12s} {'variant':18s} {'data':7s} {'setting':8s} {'shots':>5s} {'known':6s} "
      f"{'AUROC mean ± std':17s} {'train s':>8s}")
groups = {}
for r in rows:
    print(f"{r['method']:12s} {r['variant']:18s} {r['data']:7s} {r['setting']:8s} {r['shots']:5d} "
          f"{str(r['known_class'] or '-'):6s} {r['auroc_mean']:.3f} ± {r['auroc_std']:.3f}   {r['train_s_mean']:8.0f}")
    if r["setting"] == "hard":
        groups.setdefault((r["method"], r["variant"], r["data"], r["shots"]), []).append(r)
for (m, v, d, s), rs in groups.items():
    # per seed: mean over known classes, then mean ± std over seeds (as the papers' "mean" column)
    per_seed = np.mean([r["aurocs"] for r in rs], axis=0)
    print(f"{m:12s} {v:18s} {d:7s} {'hard':8s} {s:5d} {'mean':6s} {per_seed.mean():.3f} ± {per_seed.std():.3f}   "
          f"{np.mean([r['train_s_mean'] for r in rs]):8.0f}")
if rows:
    print(f"backbone {rows[0]['backbone']} [{rows[0]['weights']}], device {rows[0]['device']}, "
          f"preset {rows[0]['preset']}, seeds {rows[0]['seeds']}")
PYEOF
