#!/usr/bin/env bash
# The full reference recipe on your copy of GTZAN:
#   bash pipeline/gtzan.sh /path/to/gtzan/genres
# ResNet-50 branches (ImageNet weights from the torch cache or downloaded, else from scratch),
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

# ImageNet weights: from the torch cache, else downloaded; from scratch (said in one line) offline.
# Epochs, batch size and learning rate: the auto recipe for resnet50 (train prints it).
# Run again after an interruption: the run in models/gtzan continues (--resume).
resume=""
if [ -f models/gtzan/last.pth ]; then resume="--resume"; fi
deepfusion train --features data/gtzan/features.store --model-dir models/gtzan \
    --backbone resnet50 --split-file gtzan-fault-filtered $resume
deepfusion evaluate --checkpoint models/gtzan/best.pth
