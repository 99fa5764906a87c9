#!/usr/bin/env bash
# The README's main command: install, then run the pipeline on the embedded synthetic data.
# Everything is written under data/ and models/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

python3 -m pip install -q -e .

deepfusion synth --out data/demo/audio --genres 4 --clips-per-genre 12 --seed 0
deepfusion extract --audio-dir data/demo/audio --out data/demo/features.pkl \
    --cache-dir data/cache --quiet

echo "demo finished in $(( $(date +%s) - start )) s"
