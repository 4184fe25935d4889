#!/usr/bin/env bash
# Quick start: set up .venv, generate the synthetic demo dataset (once), run
# pipelines/demo.yaml (tiled U-Net over a 67-megapixel scene, Zarr -> Zarr),
# print Dice against the ground truth and write out/demo/preview.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
if [ ! -d data/demo/scene2d.zarr ]; then
  python examples/make_demo_data.py --out data/demo
fi
tileseg run pipelines/demo.yaml "$@"
python examples/preview.py data/demo/scene2d.zarr out/demo/scene2d_seg.zarr out/demo/preview.png --array image
