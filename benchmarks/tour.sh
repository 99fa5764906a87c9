#!/usr/bin/env bash
# The README's five-minute tour, run as the README shows it, so its output blocks can be
# refreshed from this script's output: copies the shipped real corpus (80 OGG clips, 4 genres,
# manifest.csv) into a fresh temporary folder as minigenres/, runs there
#
#   deepfusion extract --audio-dir minigenres
#   deepfusion train --features features.pkl
#   deepfusion evaluate --checkpoint best.pth
#   deepfusion predict minigenres/<a held-out clip> --checkpoint best.pth
#
# and prints each command with its whole output (stdout and stderr), then the wall time of
# each. The deepfusion of this checkout runs (it is put first on PYTHONPATH), whatever is
# installed. Usage: bash benchmarks/tour.sh [CORPUS_DIR]  (default ../shared/data/minigenres
# beside the repository). TOUR_KEEP=1 keeps the temporary folder (its path is printed).
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
corpus="${1:-$repo/../shared/data/minigenres}"

if [ ! -f "$corpus/manifest.csv" ]; then
    echo "tour.sh: $corpus holds no manifest.csv; give the minigenres folder as the argument" >&2
    exit 2
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
work="$(mktemp -d "${TMPDIR:-/tmp}/deepfusion-tour.XXXXXX")"
if [ "${TOUR_KEEP:-0}" = 1 ]; then
    echo "tour folder: $work (kept)"
else
    trap 'rm -rf "$work"' EXIT
fi
cp -r "$corpus" "$work/minigenres"
cd "$work"

names=()
times=()
status=0

run() {
    local start end rc
    echo "\$ $*"
    start=$(date +%s.%N)
    "$@" 2>&1
    rc=$?
    end=$(date +%s.%N)
    [ "$rc" -ne 0 ] && { echo "(exit status $rc)"; status=1; }
    echo
    names+=("$*")
    times+=("$(awk "BEGIN { print $end - $start }")")
}

run deepfusion extract --audio-dir minigenres
run deepfusion train --features features.pkl
run deepfusion evaluate --checkpoint best.pth
# a clip of the test split (evaluate's predictions.csv lists them), never seen in training
clip="minigenres/$(python3 -c 'import csv; print(next(csv.DictReader(open("models/predictions.csv")))["path"])')"
run deepfusion predict "$clip" --checkpoint best.pth

echo "wall times ($(nproc) cores):"
for i in "${!names[@]}"; do
    printf '%8.1f s  %s\n' "${times[$i]}" "${names[$i]}"
done
exit "$status"
