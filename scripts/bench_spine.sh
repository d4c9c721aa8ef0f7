#!/usr/bin/env bash
# DevNet and DRA, general setting, 10 shots, quick preset, seeds 0 1 2, on HeadCT and ELPV,
# with the offline ImageNet EfficientNet-Lite0 and with a random-init ResNet-18.
# Writes bench_results/spine_<data>_<backbone>.json and prints mean ± std tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
for data in headct elpv; do
  for bb in lite0 r18random; do
    case $bb in
      lite0) args="--backbone efficientnet_lite0 --weights imagenet" ;;
      r18random) args="--backbone resnet18 --weights random" ;;
    esac
    $PY -m osad_core benchmark --data $data --methods devnet,dra --setting general --shots 10 \
      --seeds $SEEDS --preset quick $args --no-db --json bench_results/spine_${data}_${bb}.json
  done
done
