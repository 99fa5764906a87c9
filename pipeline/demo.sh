#!/usr/bin/env bash
# The README's main command: from a fresh clone, install deepfusion and run the whole pipeline
# (synth -> extract -> train -> evaluate -> predict) on the embedded synthetic demo data, on the
# CPU. Everything is written under data/demo/ and models/demo/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

python3 -m pip install -q -e .

deepfusion synth --out data/demo/audio --genres 4 --clips-per-genre 15 --duration 30 --seed 0 \
    --overwrite   # the demo owns data/demo: clips of an older demo are replaced too
deepfusion extract --audio-dir data/demo/audio --out data/demo/features.pkl \
    --cache-dir data/cache --quiet
deepfusion train --features data/demo/features.pkl --model-dir models/demo --overwrite \
    --backbone light --device cpu --val-size 0.2 --test-size 0.2 --seed 0 --quiet
deepfusion evaluate --checkpoint models/demo/best.pth
clip=$(ls data/demo/audio/*/*.wav | head -n 1)
deepfusion predict "$clip" --checkpoint models/demo/best.pth --top-k 3

echo
echo "pictures: models/demo/training_history.png, models/demo/confusion_matrix.png, models/demo/attention.png"
echo "demo finished in $(( $(date +%s) - start )) s"
