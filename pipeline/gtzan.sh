#!/usr/bin/env bash
# The full reference recipe on your copy of GTZAN:
#   bash pipeline/gtzan.sh /path/to/gtzan/genres
# ResNet-50 branches (ImageNet weights when they are in the torch cache, otherwise from scratch),
# GTZAN's artist-conditional fault-filtered split, the GPU when there is one. The features
# (about 4 GB) go into a memory-mapped feature store, so they need not fit in RAM. Ends with the
# evaluation report on the split's test clips.
set -euo pipefail
if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: bash pipeline/gtzan.sh GTZAN_DIR   (the folder holding blues/, classical/, ...)" >&2
    exit 2
fi
gtzan=$1
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .

deepfusion extract --audio-dir "$gtzan" --format store --out data/gtzan/features.store \
    --cache-dir data/cache

pretrained=--no-pretrained
if python3 -c "import sys; from deepfusion.models import pretrained_weights_file as f; sys.exit(0 if f('resnet50').is_file() else 1)"; then
    pretrained=--pretrained
else
    echo "ImageNet weights for resnet50 not in the torch cache: training from scratch"
fi
deepfusion train --features data/gtzan/features.store --model-dir models/gtzan \
    --backbone resnet50 "$pretrained" --split-file gtzan-fault-filtered \
    --epochs 100 --batch-size 32 --lr 1e-4 --patience 20
deepfusion evaluate --checkpoint models/gtzan/best.pth
