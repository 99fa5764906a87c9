#!/usr/bin/env bash
# deepfusion's GPU paths on a real GPU, in one run of under 10 minutes, ending in ONE table.
#
# What it checks (each a row of the table; a failed step is a row saying so, and the script
# goes on):
#   * the device, its compute capability and the precision --amp chooses (bf16 from 8.0 on);
#   * feature extraction throughput: the numpy backend on the CPU against --backend torch on
#     the GPU (skipped, with a row, when this deepfusion's extract has no --backend), and the
#     largest difference per view between the two (they share the cache key);
#   * short training runs on synthetic data (deepfusion synth, --no-pretrained): light 3
#     epochs and resnet18 2 epochs, in fp16 and, where the GPU computes it natively, bf16;
#     a --deterministic run twice (identical weights?);
#   * resume: a CPU run continued on the GPU in fp16 (its scaler state is empty), then the
#     GPU run continued on the CPU;
#   * evaluate on the GPU against the CPU (predictions compared, and against the test
#     accuracy train stored), and with --precision amp where the command has it;
#   * a checkpoint loaded with CUDA hidden (CUDA_VISIBLE_DEVICES=) by torch.load(weights_only);
#   * which GPUs hold a CUDA context after a --device cpu run (none expected) and, with two
#     or more GPUs, after a cuda:1 run (cuda:1 only);
#   * peak memory (torch.cuda.max_memory_allocated) and speed of resnet50 training steps at the
#     default 3-s crop and at whole 30-s clips, beside deepfusion's estimate.
#
# On a machine without a GPU it says so and exits 0 before writing anything.
#
# Usage: bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python), GPU_CHECK_DEVICE (default cuda, i.e. cuda:0),
#              GPU_CHECK_DIR (work folder; default a new temporary one, kept for the logs).

set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python}
DEV=${GPU_CHECK_DEVICE:-cuda}
HELPER="$HERE/gpu_check.py"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

info=$("$PY" "$HELPER" probe "$DEV")
rc=$?
if [ "$rc" -eq 3 ]; then
    echo "$info"
    exit 0
elif [ "$rc" -ne 0 ]; then
    echo "$info"
    echo "gpu_check: the device probe failed (exit $rc); is deepfusion importable by $PY?" >&2
    exit 1
fi
DEVICE_LINE=$(sed -n 1p <<<"$info")
BF16=$(sed -n 2p <<<"$info")
GPUS=$(sed -n 3p <<<"$info" | cut -d= -f2)
echo "$DEVICE_LINE"

W=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$W/logs" "$W/runs"
R="$W/results.tsv"
: > "$R"
printf 'device\t%s\t\n' "$DEVICE_LINE" >> "$R"
echo "work folder: $W (logs in $W/logs)"

record() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >> "$R"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
dfn() { "$PY" -m deepfusion "$@"; }

# step NAME COMMAND...: run, log, time; on failure a row with the log's last line
step() {
    local name=$1; shift
    local log="$W/logs/${name// /_}.log" t0; t0=$(now)
    echo "... $name"
    "$@" > "$log" 2>&1
    local rc=$?
    LAST_SECONDS=$(since "$t0")
    if [ "$rc" -ne 0 ]; then
        record "$name" "FAILED (exit $rc): $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)" "$LAST_SECONDS"
    fi
    return "$rc"
}

TRAIN=(--no-pretrained --val-size 0.2 --test-size 0.2 --batch-size 16 --seed 0 --quiet)
NCLIPS=48

# ------------------------------------------------------------------ data and extraction
step "synth" dfn synth --out "$W/audio" --genres 4 --clips-per-genre 12 --duration 10 --seed 0
# --backend numpy: without it, extract's --device auto takes the GPU on this machine
if step "extract cpu (numpy)" dfn extract --audio-dir "$W/audio" --out "$W/features.pkl" \
        --duration 10 --cache-dir "$W/cache-cpu" --backend numpy --quiet; then
    CPU_S=$LAST_SECONDS
    record "extract cpu (numpy, $(nproc) cores)" \
        "$NCLIPS clips of 10 s: $(awk -v n=$NCLIPS -v s="$CPU_S" 'BEGIN{printf "%.1f", n/s}') clips/s (process start included)" "$CPU_S"
fi
if dfn extract --help 2>/dev/null | grep -q -- '--backend'; then
    if step "extract gpu (torch)" dfn extract --audio-dir "$W/audio" --out "$W/features-gpu.pkl" \
            --duration 10 --cache-dir "$W/cache-gpu" --backend torch --device cuda --quiet; then
        record "extract gpu (torch)" "$NCLIPS clips of 10 s: $(awk -v n=$NCLIPS -v s="$LAST_SECONDS" \
            'BEGIN{printf "%.1f", n/s}') clips/s; $(awk -v a="${CPU_S:-0}" -v b="$LAST_SECONDS" \
            'BEGIN{ if (a > 0) printf "%.1fx the CPU", a/b; else printf "no CPU figure" }')" "$LAST_SECONDS"
        [ -e "$W/features.pkl" ] && "$PY" "$HELPER" views "$R" "features: gpu (torch) vs cpu (numpy)" \
            "$W/features.pkl" "$W/features-gpu.pkl" > "$W/logs/views.log" 2>&1 \
            || record "features: gpu (torch) vs cpu (numpy)" "FAILED: $(tail -n 1 "$W/logs/views.log")"
    fi
else
    record "extract gpu (torch)" "skipped: this deepfusion's extract has no --backend"
fi
F="$W/features.pkl"
if [ ! -e "$F" ]; then
    record "training and the rest" "skipped: no features file"
    "$PY" "$HELPER" table "$R"
    exit 1
fi

# ------------------------------------------------------------------------------- training
train_run() {   # NAME BACKBONE EPOCHS PRECISION [more train options]
    local name=$1 backbone=$2 epochs=$3 precision=$4; shift 4
    local amp=(--amp --amp-dtype "$precision")
    [ "$precision" = fp32 ] && amp=(--no-amp)
    if step "train $name" dfn train --features "$F" --model-dir "$W/runs/$name" --backbone "$backbone" \
            --epochs "$epochs" --device "$DEV" "${amp[@]}" "${TRAIN[@]}" "$@"; then
        "$PY" "$HELPER" summary "$R" "train $name" "$W/runs/$name"
    fi
}
train_run light-fp16 light 3 fp16
train_run resnet18-fp16 resnet18 2 fp16
if [ "$BF16" = "bf16=yes" ]; then
    train_run light-bf16 light 3 bf16
    train_run resnet18-bf16 resnet18 2 bf16
else
    record "train bf16 runs" "skipped: compute capability below 8.0 (no native bf16; --amp uses fp16)"
fi
train_run det-a light 2 fp32 --deterministic
train_run det-b light 2 fp32 --deterministic
if [ -e "$W/runs/det-a/best.pth" ] && [ -e "$W/runs/det-b/best.pth" ]; then
    "$PY" "$HELPER" same "$R" "--deterministic, run twice (light, fp32)" "$W/runs/det-a" "$W/runs/det-b"
    ops=$(grep -ho '[A-Za-z_0-9]* does not have a deterministic implementation' "$W"/logs/train_det-a.log \
          | sort -u | cut -d' ' -f1 | paste -sd, -)
    [ -n "$ops" ] && record "--deterministic: ops torch warned about" "$ops"
fi

# --------------------------------------------------------------------------------- resume
if step "resume: cpu run" dfn train --features "$F" --model-dir "$W/runs/moved" --backbone light \
        --epochs 1 --device cpu "${TRAIN[@]}"; then
    if step "resume: cpu run continued on $DEV fp16" dfn train --features "$F" --model-dir "$W/runs/moved" \
            --resume --epochs 2 --device "$DEV" --amp --amp-dtype fp16 --quiet; then
        record "resume: cpu run continued on $DEV fp16" "ok ($(grep -c '' "$W/runs/moved/training_history.csv") lines of history)" "$LAST_SECONDS"
        if step "resume: $DEV run continued on cpu" dfn train --features "$F" --model-dir "$W/runs/moved" \
                --resume --epochs 3 --device cpu --quiet; then
            record "resume: $DEV run continued on cpu" "ok" "$LAST_SECONDS"
        fi
    fi
fi

# ------------------------------------------------------------------------------- evaluate
CK="$W/runs/resnet18-fp16/best.pth"
[ -e "$CK" ] || CK="$W/runs/light-fp16/best.pth"
if [ -e "$CK" ]; then
    dirs=()
    step "evaluate on cpu" dfn evaluate --checkpoint "$CK" --device cpu --out-dir "$W/eval-cpu" && dirs+=("$W/eval-cpu")
    step "evaluate on $DEV" dfn evaluate --checkpoint "$CK" --device "$DEV" --out-dir "$W/eval-gpu" && dirs+=("$W/eval-gpu")
    if dfn evaluate --help 2>/dev/null | grep -q -- '--precision'; then
        step "evaluate on $DEV amp" dfn evaluate --checkpoint "$CK" --device "$DEV" --precision amp \
            --out-dir "$W/eval-gpu-amp" && dirs+=("$W/eval-gpu-amp")
    else
        record "evaluate --precision amp" "skipped: this deepfusion's evaluate has no --precision"
    fi
    [ "${#dirs[@]}" -ge 2 ] && "$PY" "$HELPER" compare "$R" "evaluate $(basename "$(dirname "$CK")"): gpu vs cpu" "$CK" "${dirs[@]}"
    # with CUDA hidden: the file loads (CPU tensors), and evaluate runs on the CPU
    CUDA_VISIBLE_DEVICES= "$PY" "$HELPER" hidden "$R" "checkpoint with CUDA hidden" "$CK" \
        > "$W/logs/hidden.log" 2>&1 || record "checkpoint with CUDA hidden" "FAILED: $(tail -n 1 "$W/logs/hidden.log")"
    if CUDA_VISIBLE_DEVICES= step "evaluate with CUDA hidden" dfn evaluate --checkpoint "$CK" \
            --device cpu --out-dir "$W/eval-hidden"; then
        record "evaluate with CUDA hidden" "ok" "$LAST_SECONDS"
    fi
fi

# ------------------------------------------------------------------------- CUDA contexts
"$PY" "$HELPER" contexts "$R" "CUDA contexts after a --device cpu run" "$F" "$W/runs/ctx-cpu" cpu \
    > "$W/logs/ctx-cpu.log" 2>&1 || record "CUDA contexts after a --device cpu run" "FAILED: $(tail -n 1 "$W/logs/ctx-cpu.log")"
if [ "${GPUS:-1}" -ge 2 ]; then
    "$PY" "$HELPER" contexts "$R" "CUDA contexts after a cuda:1 run" "$F" "$W/runs/ctx-1" cuda:1 \
        > "$W/logs/ctx-1.log" 2>&1 || record "CUDA contexts after a cuda:1 run" "FAILED: $(tail -n 1 "$W/logs/ctx-1.log")"
else
    record "CUDA contexts after a cuda:1 run" "skipped: one GPU visible"
fi

# ------------------------------------------------------------------------------ memory
"$PY" "$HELPER" memory "$R" "$DEV" > "$W/logs/memory.log" 2>&1 \
    || record "peak memory" "FAILED: $(tail -n 1 "$W/logs/memory.log")"

"$PY" "$HELPER" table "$R"
