#!/usr/bin/env bash
# The main job without downloadable weights: a full-size BROW ViT-B/16 with SEEDED RANDOM
# weights (labelled as such in the output and the manifest) goes through export ->
# INT8 calibration -> parity verification -> bundle -> predict -> verify -> bench.
# With the real checkpoint, replace --random-weights by --weights brow_backbone.pth.
set -euo pipefail
work=${1:-demo}
mkdir -p "$work"
python examples/make_tiles.py "$work/tiles" 40
omedge devices
omedge export brow --random-weights --format onnx,openvino --int8 --calib "$work/tiles" \
    -o "$work/brow-int8.omedge" --overwrite
omedge predict "$work/brow-int8.omedge" "$work/tiles/tile_000.png" "$work/tiles/tile_001.png"
omedge predict "$work/brow-int8.omedge" "$work/tiles/tile_000.png" --json | python -c \
    "import json,sys; d=json.load(sys.stdin); print('runtime:', d['runtime']['backend'], d['runtime']['device'], d['runtime']['precision'], '| embedding dim', len(d['results'][0]['embedding']))"
omedge verify "$work/brow-int8.omedge"
omedge bench "$work/brow-int8.omedge" --runs 20
