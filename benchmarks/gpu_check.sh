#!/usr/bin/env bash
# deepfusion on a GPU (or, without one, the same table on the CPU) in one run, ending in ONE
# markdown table on stdout, under a line naming the machine; progress goes to stderr, logs to
# GPU_CHECK_DIR/logs. Exit status 1 when a correctness check fails (a FAILED or OVER row).
#
# Sections (each a group of rows; a row holds a measured figure or says "not measured (why)"):
#   extract  clips/s of extract on 30-s synthetic clips (deepfusion synth), a fresh cache per
#            run and an untimed warm-up before it: the numpy backend with all cores, the torch
#            backend on the device with 1, 2, 4, ... decode workers up to the core count, the
#            device's busy share (where extract reports it), and the two backends' features
#            against the tolerances their shared cache key rests on;
#   train    training throughput (segments/s) and peak memory of light/resnet18/resnet50 at
#            fp32/bf16/fp16 and batch 16-128 on 3-s crops, and resnet50 on whole 30-s clips
#            beside train's memory estimate (CPU mode: a reduced grid);
#   predict  deepfusion export of a light model trained on the device (--deterministic),
#            then predict's clips/s with the torch engine on the device and the onnx engine
#            (onnxruntime's CUDA provider where installed), features cached, and how far
#            their answers are apart;
#   checks   that training again (identical weights?); on a GPU also: a CPU run resumed on
#            the GPU in fp16 and back on the CPU, evaluate on the GPU against the CPU (and
#            --precision amp), the checkpoint loaded with CUDA hidden, the CUDA contexts a
#            --device cpu run (and, with two GPUs, a cuda:1 run) leaves.
# The sections run in this order, so that a run short of time loses the checks last.
#
# Usage:  bash benchmarks/gpu_check.sh > table.md
#         GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh      # the CPU mode on a GPU machine
# Environment: PYTHON (default python3), GPU_CHECK_DEVICE (default auto: cuda:0 where torch
#   sees a GPU, else the CPU mode), GPU_CHECK_DIR (work folder, kept for the logs; default a
#   new temporary one), GPU_CHECK_SECTIONS (default "extract train predict checks"),
#   GPU_CHECK_BUDGET_S (seconds for the whole run; default 450 on a GPU, 600 on the CPU: a
#   step that would start later is a row saying so) and per section GPU_CHECK_BUDGET_EXTRACT,
#   _TRAIN, _PREDICT; sizes: GPU_CHECK_CLIPS, GPU_CHECK_GRID, GPU_CHECK_PRECISIONS,
#   GPU_CHECK_FULL, GPU_CHECK_STEPS, GPU_CHECK_WARMUP (see benchmarks/gpu_check.py).
# Timing: on a GPU the run's budget (450 s) keeps it under 8 minutes; the GPU defaults are
# sized to fit it on a 16-core H200 but are not yet measured there. The CPU mode took 262 s
# on this project's 2-core machine (docs/scaling.md quotes its table).

set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python3}
HELPER="$HERE/gpu_check.py"
SECTIONS=" ${GPU_CHECK_SECTIONS:-extract train predict checks} "
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)

info=$("$PY" "$HELPER" probe "${GPU_CHECK_DEVICE:-auto}")
rc=$?
if [ "$rc" -ne 0 ]; then
    [ "$rc" -ne 2 ] && echo "gpu_check: the machine probe failed (exit $rc); is deepfusion importable by $PY?" >&2
    exit "$rc"
fi
HEADER=$(sed -n 1p <<<"$info")
DEV=$(sed -n 's/^device=//p' <<<"$info")
GPUS=$(sed -n 's/^gpus=//p' <<<"$info")
CORES=$(sed -n 's/^cores=//p' <<<"$info")
PRECISIONS=$(sed -n 's/^precisions=//p' <<<"$info")
case "$DEV" in cuda*) GPU=1 ;; *) GPU=0 ;; esac
NO_GPU="not measured (no GPU)"
[ "$GPU" = 0 ] && [ "$(sed -n 's/^gpus=//p' <<<"$info")" != 0 ] && NO_GPU="not measured (the CPU mode: GPU_CHECK_DEVICE=$GPU_CHECK_DEVICE)"
echo "gpu_check: $HEADER" >&2

if [ "$GPU" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-450}; else BUDGET=${GPU_CHECK_BUDGET_S:-600}; fi
B_EXTRACT=${GPU_CHECK_BUDGET_EXTRACT:-$((BUDGET * 20 / 100))}
B_TRAIN=${GPU_CHECK_BUDGET_TRAIN:-$((BUDGET * 35 / 100))}
B_PREDICT=${GPU_CHECK_BUDGET_PREDICT:-$((BUDGET * 10 / 100))}

W=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$W/logs" "$W/runs"
R="$W/results.tsv"
: > "$R"
echo "gpu_check: work folder $W (logs in $W/logs)" >&2

record() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >> "$R"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
left() { echo $((BUDGET - ($(date +%s) - T_START))); }      # seconds of the run's budget left
section() { [[ "$SECTIONS" == *" $1 "* ]]; }
dfn() { "$PY" -m deepfusion "$@"; }
OUT_OF_TIME="not measured (the run's budget of $BUDGET s (GPU_CHECK_BUDGET_S) was spent)"

# step NAME COMMAND...: run, log, time; a failure is a row with the log's last line. A step
# that would start after the run's budget is a row saying so (and fails, so what needs it
# is not run either).
step() {
    local name=$1; shift
    local log="$W/logs/${name//[^A-Za-z0-9_.-]/_}.log" t0
    if [ "$(left)" -le 0 ]; then
        record "$name" "$OUT_OF_TIME"
        return 1
    fi
    t0=$(now)
    echo "... $name" >&2
    "$@" > "$log" 2>&1
    local rc=$?
    LAST_SECONDS=$(since "$t0")
    if [ "$rc" -ne 0 ]; then
        record "$name" "FAILED (exit $rc): $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)" "$LAST_SECONDS"
    fi
    return "$rc"
}
# helper NAME BUDGET SUB-COMMAND ARGS...: a Python section, its budget cut to what is left
helper() {
    local name=$1 budget=$2; shift 2
    local l; l=$(left)
    [ "$budget" -gt "$l" ] && budget=$l
    if [ "$budget" -le 0 ]; then
        record "$name" "$OUT_OF_TIME"
        return 1
    fi
    echo "... $name (budget $budget s)" >&2
    # the helper writes nothing to stdout but JSON of its cells; its progress goes on to stderr
    "$PY" "$HELPER" "$@" --budget "$budget" 2>&1 >/dev/null | tee "$W/logs/$name.log" >&2
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && record "$name" "FAILED (exit $rc): $(grep -v '^\s*$' "$W/logs/$name.log" | tail -n 1 | cut -c1-200)"
    return "$rc"
}

F="$W/features-numpy-$CORES.pkl"       # the numpy run's features and cache: what train,
CACHE="$W/cache/numpy-$CORES"          # evaluate and predict read
TRAIN=(--no-pretrained --val-size 0.2 --test-size 0.2 --batch-size 16 --seed 0 --quiet)
NO_FEATURES="not measured (no features file: the extract section did not write $F)"

# ---------------------------------------------------------------------------------- extract
if section extract; then
    helper extract "$B_EXTRACT" extract "$R" "$DEV" "$W"
fi

# ------------------------------------------------------------------------------------ train
if section train; then
    helper train "$B_TRAIN" grid "$R" "$DEV"
fi

# ------------------------------------------------- checks and predict (in order of worth)
CK=""
if section checks || section predict; then
    if [ ! -e "$F" ]; then
        record "checks and predict" "$NO_FEATURES"
    # an fp32 light run with --deterministic on the device: the model evaluate and predict use
    elif step "train det-a" dfn train --features "$F" --model-dir "$W/runs/det-a" --backbone light \
            --epochs 2 --device "$DEV" --no-amp --deterministic "${TRAIN[@]}"; then
        CK="$W/runs/det-a/best.pth"
    fi
fi

if section predict; then
    if [ -z "$CK" ]; then
        record "predict" "not measured (no checkpoint: the deterministic training run did not finish)"
    else
        # without onnxruntime (or without a model, when export failed: its row says why) the
        # helper's onnx row says so
        "$PY" -c "import onnxruntime" 2>/dev/null \
            && step "predict: deepfusion export" dfn export --checkpoint "$CK" --out "$W/model.onnx"
        helper predict "$B_PREDICT" predict "$R" "$DEV" "$CK" "$W/model.onnx" "$W/audio" "$CACHE"
    fi
fi

GPU_ONLY=("check: resume a CPU run on the GPU in fp16, then on the CPU"
          "check: evaluate on the GPU vs the CPU (fp32 and --precision amp)"
          "check: a GPU-trained checkpoint loaded with CUDA hidden"
          "check: CUDA contexts after a --device cpu run")
if section checks && [ -n "$CK" ]; then
    # the deterministic run again: the same weights?
    if step "train det-b" dfn train --features "$F" --model-dir "$W/runs/det-b" --backbone light \
            --epochs 2 --device "$DEV" --no-amp --deterministic "${TRAIN[@]}"; then
        "$PY" "$HELPER" same "$R" "check: --deterministic, run twice (light, fp32, $DEV)" \
            "$W/runs/det-a" "$W/runs/det-b"
        ops=$(grep -ho '[A-Za-z_0-9]* does not have a deterministic implementation' "$W"/logs/train_det-a.log \
              | sort -u | cut -d' ' -f1 | paste -sd, -)
        [ -n "$ops" ] && record "check: --deterministic, ops torch warned about" "$ops"
    fi
fi
if section checks && [ "$GPU" = 0 ]; then
    for name in "${GPU_ONLY[@]}" "check: CUDA contexts after a cuda:1 run"; do
        record "$name" "$NO_GPU"
    done
elif section checks && [ -n "$CK" ]; then
    # resume across devices: a CPU run continued on the GPU in fp16 (its scaler state is
    # empty), then the GPU run continued on the CPU
    name=${GPU_ONLY[0]}
    if [[ ",$PRECISIONS," != *",fp16,"* ]]; then
        record "$name" "not measured (no fp16 on $DEV)"
    elif step "resume: cpu run" dfn train --features "$F" --model-dir "$W/runs/moved" --backbone light \
            --epochs 1 --device cpu "${TRAIN[@]}" \
        && step "resume: on $DEV fp16" dfn train --features "$F" --model-dir "$W/runs/moved" \
            --resume --epochs 2 --device "$DEV" --amp --amp-dtype fp16 --quiet \
        && step "resume: back on cpu" dfn train --features "$F" --model-dir "$W/runs/moved" \
            --resume --epochs 3 --device cpu --quiet; then
        record "$name" "ok ($(($(grep -c '' "$W/runs/moved/training_history.csv") - 1)) epochs in the history)"
    fi
    # evaluate on the GPU against the CPU (the deterministic run's checkpoint, trained on the GPU)
    dirs=()
    step "evaluate on cpu" dfn evaluate --checkpoint "$CK" --device cpu --out-dir "$W/eval-cpu" \
        && dirs+=("$W/eval-cpu")
    step "evaluate on $DEV" dfn evaluate --checkpoint "$CK" --device "$DEV" --out-dir "$W/eval-gpu" \
        && dirs+=("$W/eval-gpu")
    step "evaluate on $DEV amp" dfn evaluate --checkpoint "$CK" --device "$DEV" --precision amp \
        --out-dir "$W/eval-gpu-amp" && dirs+=("$W/eval-gpu-amp")
    [ "${#dirs[@]}" -ge 2 ] && "$PY" "$HELPER" compare "$R" "${GPU_ONLY[1]}" "$CK" "${dirs[@]}"
    # with CUDA hidden: the file loads (CPU tensors)
    if [ "$(left)" -le 0 ]; then
        record "${GPU_ONLY[2]}" "$OUT_OF_TIME"
    else
        CUDA_VISIBLE_DEVICES= "$PY" "$HELPER" hidden "$R" "${GPU_ONLY[2]}" "$CK" > "$W/logs/hidden.log" 2>&1 \
            || record "${GPU_ONLY[2]}" "FAILED: $(tail -n 1 "$W/logs/hidden.log")"
    fi
    # which GPUs hold a CUDA context after a --device cpu run (none expected), and after cuda:1
    if [ "$(left)" -le 0 ]; then
        record "${GPU_ONLY[3]}" "$OUT_OF_TIME"
    else
        "$PY" "$HELPER" contexts "$R" "${GPU_ONLY[3]}" "$F" "$W/runs/ctx-cpu" cpu > "$W/logs/ctx-cpu.log" 2>&1 \
            || record "${GPU_ONLY[3]}" "FAILED: $(tail -n 1 "$W/logs/ctx-cpu.log")"
    fi
    if [ "${GPUS:-1}" -lt 2 ]; then
        record "check: CUDA contexts after a cuda:1 run" "not measured (one GPU visible)"
    elif [ "$(left)" -le 0 ]; then
        record "check: CUDA contexts after a cuda:1 run" "$OUT_OF_TIME"
    else
        "$PY" "$HELPER" contexts "$R" "check: CUDA contexts after a cuda:1 run" "$F" "$W/runs/ctx-1" cuda:1 \
            > "$W/logs/ctx-1.log" 2>&1 \
            || record "check: CUDA contexts after a cuda:1 run" "FAILED: $(tail -n 1 "$W/logs/ctx-1.log")"
    fi
fi

record "gpu_check.sh, the whole run" "$(($(date +%s) - T_START)) s wall (GPU_CHECK_BUDGET_S=$BUDGET); \
load average $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown) at the end"
"$PY" "$HELPER" table "$R" "$HEADER"
