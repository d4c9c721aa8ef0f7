#!/usr/bin/env bash
# Benchmark of issue 6: BGAD and CKAAD against DRA.
#   ELPV   general, 10 shots               (image AUROC)
#   ELPV   hard, 10 shots, each known class (mono, poly; one row per known class)
#   HeadCT general, 10 shots
#   BGAD with image-level labels only: coarse vs pasted (ELPV general, HeadCT general)
#   a small masked set (ELPV test normals with synthetic defects + masks): pixel AUROC, PRO
# 3 seeds each; mean ± std, training time and the backbone weights are in the tables and
# in bench_results/*.json ("runs" holds every run's metrics, pixel AUROC/PRO included).
#
# Usage: scripts/bench_bgad_ckaad.sh [preset]      (default quick; "paper" wants a GPU)
# Env:   PY (python, default .venv/bin/python), SEEDS (default "0 1 2"), OUT (bench_results)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${1:-quick}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
bench() { "$PY" -m osad_core benchmark --preset "$PRESET" --seeds $SEEDS --no-db "$@"; }

# 1. the three methods under DRA's protocol
bench --data elpv   --methods bgad,ckaad,dra --setting general --shots 10 --json "$OUT/elpv_general_$PRESET.json"
bench --data elpv   --methods bgad,ckaad,dra --setting hard    --shots 10 --json "$OUT/elpv_hard_$PRESET.json"
bench --data headct --methods bgad,ckaad,dra --setting general --shots 10 --json "$OUT/headct_general_$PRESET.json"

# 2. BGAD without masks (ELPV and HeadCT have none): every position of a labelled image is
#    anomalous ("coarse", the default above) vs only pasted defects with known masks
for DATA in elpv headct; do
  bench --data "$DATA" --methods bgad --setting general --shots 10 --set image_label_masks=pasted \
        --json "$OUT/${DATA}_general_bgad_pasted_$PRESET.json"
done

# 3. pixel-level check on a masked set built from ELPV: test normals with synthetic dark
#    cracks ("crack") and bright blobs ("blob") and their masks, in MVTec layout
MASKED="$OUT/elpv_masked"
"$PY" - "$MASKED" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from osad_core.data import import_elpv, read_image

root = Path(sys.argv[1])
if (root / "test").is_dir():
    sys.exit(0)
ds = import_elpv()
rng = np.random.default_rng(0)
train = ds.select(split="train", label=0)
test = ds.select(split="test", label=0)
order = rng.permutation(len(test))
good, defect = [test[i] for i in order[:177]], [test[i] for i in order[177:]]
S = 256
for sub in ("train/good", "test/good", "test/crack", "test/blob", "ground_truth/crack", "ground_truth/blob"):
    (root / sub).mkdir(parents=True, exist_ok=True)
for i, r in enumerate(train):
    read_image(r.path).convert("RGB").resize((S, S)).save(root / "train/good" / f"{i:04d}.png")
for i, r in enumerate(good):
    read_image(r.path).convert("RGB").resize((S, S)).save(root / "test/good" / f"{i:04d}.png")
for i, r in enumerate(defect):
    img = np.asarray(read_image(r.path).convert("RGB").resize((S, S))).astype(np.float32)
    kind = "crack" if i % 2 == 0 else "blob"
    m = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(m)
    if kind == "crack":  # a dark polyline, 2-4 px wide
        pts = [tuple(rng.uniform(30, S - 30, 2))]
        for _ in range(int(rng.integers(2, 5))):
            pts.append(tuple(np.clip(np.array(pts[-1]) + rng.normal(0, 30, 2), 5, S - 5)))
        d.line(pts, fill=255, width=int(rng.integers(2, 5)))
        mask = np.asarray(m) > 0
        img[mask] *= rng.uniform(0.2, 0.5)
    else:  # a bright irregular blob
        noise = ndimage.gaussian_filter(rng.normal(size=(S, S)), 8)
        cy, cx = rng.uniform(50, S - 50, 2)
        yy, xx = np.mgrid[:S, :S]
        rad = rng.uniform(10, 25)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2 * (1 + 8 * noise).clip(0.3, 2))
        img[mask] = img[mask] * 0.4 + 255 * 0.6
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"test/{kind}" / f"{i:04d}.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(root / f"ground_truth/{kind}" / f"{i:04d}_mask.png")
print(f"masked set in {root}")
PYEOF
bench --data "$MASKED" --methods bgad,ckaad,dra --setting general --shots 10 --json "$OUT/elpv_masked_general_$PRESET.json"
bench --data "$MASKED" --methods bgad,ckaad,dra --setting hard --known-class crack --shots 10 \
      --json "$OUT/elpv_masked_hard_crack_$PRESET.json"

"$PY" scripts/bench_table.py "$OUT"/*_"$PRESET".json
