#!/usr/bin/env bash
# AHL(DRA) and AHL(DevNet) against their base models (issue #3), 3 seeds each:
#   ELPV general 1 / 10 shots, ELPV hard (seen class mono, and poly) 1 / 10 shots,
#   HeadCT general 1 / 10 shots.
# AHL's stage A trains the same base model as the separate dra / devnet rows (same preset,
# seed and shared settings), so each pair compares AHL with its own base.
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
    run "${tag}_dra"        --data "$data" --setting "$setting" --shots "$shots" --methods dra
    run "${tag}_ahl-devnet" --data "$data" --setting "$setting" --shots "$shots" --methods ahl --set base=devnet
    run "${tag}_devnet"     --data "$data" --setting "$setting" --shots "$shots" --methods devnet
  done
done

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("*.json")):
    method = f.stem.rsplit("_", 1)[1].replace("ahl-", "AHL(").replace("dra", "DRA").replace("devnet", "DevNet")
    method += ")" if method.startswith("AHL(") else ""
    for r in json.loads(f.read_text())["rows"]:
        key = (r["data"], r["setting"], r["shots"])
        rows.setdefault(key, {}).setdefault(method, []).append(r)
    stages = [json.loads(m) for m in re.findall(r"stage times: (\{.*?\})", (out / f"{f.stem}.log").read_text()
                                                .replace("'", '"'))] if (out / f"{f.stem}.log").exists() else []
    if stages:
        mean = {k: np.mean([s[k] for s in stages]) for k in stages[0]}
        print(f"{f.stem}: AHL stage seconds (mean of {len(stages)} runs) " +
              ", ".join(f"{k} {v:.0f}" for k, v in mean.items()))
print("\n| data | setting | shots | method | image AUROC mean ± std | per seen class | train s |")
print("|---|---|---|---|---|---|---|")
info = None
for (data, setting, shots), by_method in sorted(rows.items()):
    for method in ("AHL(DRA)", "DRA", "AHL(DevNet)", "DevNet"):
        rs = by_method.get(method)
        if not rs:
            continue
        info = rs[0]
        per_seed = np.mean([r["aurocs"] for r in rs], axis=0)  # hard: mean over seen classes, per seed
        classes = ", ".join(f"{r['known_class']} {r['auroc_mean']:.3f}±{r['auroc_std']:.3f}"
                            for r in rs if r["known_class"]) or "-"
        print(f"| {data} | {setting} | {shots} | {method} | {per_seed.mean():.3f} ± {per_seed.std():.3f} | "
              f"{classes} | {np.mean([r['train_s_mean'] for r in rs]):.0f} |")
if info:
    print(f"\nseeds {info['seeds']}, preset {info['preset']}, backbone {info['backbone']} [{info['weights']}], "
          f"device {info['device']}; std = population std over seeds")
EOF
