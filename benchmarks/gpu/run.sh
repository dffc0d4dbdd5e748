#!/usr/bin/env bash
# The GPU run (issues 7 and 26): one prepared script for the device machine, run from the repository root.
#
# Before the call, here:  bash benchmarks/gpu/prepare.sh      (the wheels into .whl, CIFAR-10's bundle into .gpu-data,
#                                                             and a check that what travels fits in 64 MiB)
#                         bash benchmarks/gpu/rehearse.sh     (this script, end to end, in a stand-in for the device)
# The call:   run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpu-data"], timeout_s=540)
# A rerun at once on the still-warm machine (it keeps .gpu-work/, so a finished training is not repeated, and one
# that its limit stopped continues from its last state.pt):
#             run(command="DEADLINE_S=150 bash benchmarks/gpu/run.sh", carry=[".whl", ".gpu-data"], timeout_s=180)
# After it, here:  bash benchmarks/gpu/receive.sh FILES_AT weights/resnet50   (joins the weights, checks every SHA-256,
#                  evaluates them on the 10,000 test images against the GPU's figure)
#
# Budget: 15 minutes of device time in all, start-up (1-2 min), transfers and idle time included, one command at most
# 600 s. The script ends itself by DEADLINE_S (480 s) and gives each step its own limit; what is worth most comes
# first: training and its weights, the CUDA tests, accuracy through the API, then the serving sweeps. $OUT (at most
# 8 files of at most 16 MiB come back) holds log.txt and results.json, rewritten after every step, and, as soon as
# training has saved them, the float16 weights in 3 parts of at most 15 MiB, their SHA-256 manifest and the card.
# No --compile: it has never been measured on the device, and a cold compile costs 60-120 s of this budget.
#
# REHEARSAL=1: the same steps, code paths and $OUT files on a CPU, with only what needs CUDA scaled down (one short
# epoch, a few test images, short serving sweeps); benchmarks/gpu/rehearse.sh runs it so in a stand-in for the device.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}  # the device's own Python 3.12 with its torch
WORK=${WORK:-.gpu-work}  # git-ignored: a warm machine keeps it for a rerun
mkdir -p "$WORK/logs" "$WORK/pids"
WORK=$(cd "$WORK" && pwd)
started=$(date +%s)
CALL=$(( $(cat "$WORK/calls" 2>/dev/null || echo 0) + 1 ))  # a rerun on a warm machine is call 2, in steps.jsonl
echo "$CALL" > "$WORK/calls"
if [ -n "${REHEARSAL:-}" ]; then SCALE=4; else SCALE=1; fi  # 2 CPU cores against one GPU: the same steps, slower
DEADLINE=$(( started + ${DEADLINE_S:-$(( 480 * SCALE ))} ))
RESERVE=10  # seconds kept for the last results.json and the log
export APP_STATE_DIR=$WORK/state  # the service's registry and jobs: nothing of an earlier run is served
export APP_GRPC_PORT=0  # HTTP only: grpcio does not travel (benchmarks/gpu/wheels.py NOT_ON_DEVICE)
NOT_OK=()
stamp() { echo "=== $(( $(date +%s) - started )) s: $*"; }

summarise() {  # standard library only where the wheels are missing; the training figures need torch
    PYTHONPATH=${PYTHONPATH:-$PWD} $PY -m benchmarks.gpu.summarise --work "$WORK" --out "$OUT/results.json" --started "$started" \
        || echo "summarise failed (rc $?); results.json keeps its last version"
}

stop_leftover_services() {  # by the process groups benchmarks/gpu/server.py recorded, never by name
    for pidfile in "$WORK"/pids/*.pid; do
        [ -f "$pidfile" ] || continue
        kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null && echo "stopped a leftover service, group $(cat "$pidfile")"
        rm -f "$pidfile"
    done
}

# step NAME LIMIT_S MIN_S COMMAND...: runs COMMAND under a timeout of LIMIT_S x SCALE, cut to the deadline, and
# skips it when less than MIN_S is left; records name, rc and seconds in $WORK/steps.jsonl; then results.json.
step() {
    local name=$1 limit=$(( $2 * SCALE )) minimum=$3
    shift 3
    local left=$(( DEADLINE - $(date +%s) - RESERVE ))
    local rc status began=$(date +%s)
    if (( left < minimum )); then
        stamp "$name: skipped, ${left} s left before the deadline"
        status=skipped rc=-1
    else
        (( limit > left )) && limit=$left
        stamp "$name (limit ${limit} s)"
        timeout --kill-after=15 "$limit" "$@"
        rc=$?
        if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc == 0 )); then status=ok; else status=failed; fi
        stop_leftover_services
    fi
    echo "{\"call\": $CALL, \"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - began ))}" \
        >> "$WORK/steps.jsonl"
    stamp "$name: $status (rc $rc)"
    [ "$status" = ok ] || NOT_OK+=("$name: $status")
    summarise
    [ "$status" = ok ]
}

# The functions below run in a child bash under `timeout` (export -f); what they decide goes through files.
install_wheels() {  # the device lacks these (benchmarks/gpu/wheels.txt); pip resolves them against its own packages
    rm -rf "$WORK/site" "$WORK/site-nodeps"
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl: run benchmarks/gpu/prepare.sh here and carry .whl"; return 1; }
    # --prefix, not --target: pip then counts the device's own packages as installed and adds only what they lack
    # (a spare from .whl only where the device's copy is too old), instead of reinstalling every dependency.
    if $PY -m pip install -q --no-index --find-links .whl --no-cache-dir --disable-pip-version-check \
            --prefix "$WORK/site" -r benchmarks/gpu/wheels.txt; then
        echo "wheels installed, their dependencies checked against the device's own packages"
        $PY -c "import sysconfig; print(*{sysconfig.get_path(kind, vars={'base': '$WORK/site', 'platbase': '$WORK/site'})
                 for kind in ('purelib', 'platlib')}, sep=':')" > "$WORK/site-path"
    else
        echo "pip could not resolve the wheels against the device's packages; installing every wheel as it is"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$WORK/site-nodeps" .whl/*.whl || return 1
        echo "$WORK/site-nodeps" > "$WORK/site-path"
    fi
}

describe_environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import sys, fastapi, pydantic, pydantic_core, pydantic_settings, starlette, uvicorn, python_multipart, torch
import app, model, training
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| fastapi', fastapi.__version__,
      '| pydantic', pydantic.VERSION, '| pydantic-core', pydantic_core.__version__)"
}

unpack_data() {
    [ -f .cache/cifar10/cifar-10-batches-py/test_batch ] && return 0
    [ -f .gpu-data/compact/unpack.py ] || { echo "no .gpu-data/compact: run benchmarks/gpu/prepare.sh and carry .gpu-data"; return 1; }
    $PY .gpu-data/compact/unpack.py --out .cache/cifar10
}

random_checkpoint() {  # serving speed does not depend on what the weights learnt; used only if training failed
    $PY -c "from pathlib import Path; from benchmarks.serve_load import make_checkpoint
make_checkpoint(Path('$WORK/random-resnet50'), 'resnet50')"
}

if [ -n "${REHEARSAL:-}" ]; then
    TRAIN_ARGS=(--arch resnet50 --epochs 1 --warmup-epochs 0.5 --batch-size 32 --train-limit 256 --test-limit 128)
    TEST_ARGS=()
    API_ARGS=(--test-limit 64 --tolerance 100 --concurrency 8)
    SERVE_ARGS=(--offline-batches 1 8 --offline-seconds 0.5 --concurrency 8 1 --workers 2 --duration 2 --warmup 0.5
                --batch-files 8 --batch-concurrency 2 --max-batch-size 32 --batching-off-concurrency 1)
else
    TRAIN_ARGS=()  # the gpu recipe's defaults: ResNet-50, bf16 autocast, 35 epochs
    TEST_ARGS=(--timeout 45)  # one hung test costs 45 s, and the session still ends and writes its report
    API_ARGS=(--concurrency 64)
    SERVE_ARGS=()
fi

export PY WORK BENCHMARK_PID_DIR=$WORK/pids
export -f install_wheels unpack_data random_checkpoint
step environment 90 30 bash -c install_wheels || { summarise; exit 1; }
export PYTHONPATH=$(cat "$WORK/site-path"):$PWD
echo "PYTHONPATH=$PYTHONPATH"
describe_environment 2>&1 | tee "$WORK/environment.txt"
step "CIFAR-10 from the compact bundle" 120 20 bash -c unpack_data
data_ok=$?

# Training gets the largest share (380 of the 480 s): nothing else matters as much, and its time on the device has
# never been measured. A run its limit stops leaves state.pt (every 5 epochs), which a rerun continues.
CHECKPOINT=$WORK/run/checkpoint
if [ -f "$CHECKPOINT/model.safetensors" ] && [ -f "$CHECKPOINT/card.json" ]; then
    stamp "training: the checkpoint of an earlier call is in $CHECKPOINT, kept"
elif (( data_ok == 0 )) && [ -f "$WORK/run/state.pt" ]; then
    step "training, resumed from the state.pt an earlier call left" 380 60 \
        $PY -m training --resume --run-dir "$WORK/run"
elif (( data_ok == 0 )); then
    rm -rf "$WORK/run"
    step "training ${TRAIN_ARGS[*]}" 380 120 \
        $PY -m training --data-dir .cache/cifar10 --skip-integrity-check --run-dir "$WORK/run" \
            --weights-dtype float16 --no-plots --checkpoint-every 5 "${TRAIN_ARGS[@]}"
fi
if [ -f "$CHECKPOINT/model.safetensors" ]; then
    # The weights leave first: whatever fails or runs out of time after this, they come back.
    $PY benchmarks/gpu/weights_parts.py split "$CHECKPOINT" "$OUT" && sha256sum "$OUT"/model.safetensors.part*
    SERVED=$CHECKPOINT
else
    step "a random-init ResNet-50 to measure serving with (no trained checkpoint)" 60 20 bash -c random_checkpoint
    SERVED=$WORK/random-resnet50
fi

mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
step "GPU-marked tests: ${GPU_TESTS[*]}" 120 30 \
    $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml "$WORK/gpu-tests.xml" "${TEST_ARGS[@]}" "${GPU_TESTS[@]}"

if [ -f "$CHECKPOINT/model.safetensors" ] && (( data_ok == 0 )); then
    step "accuracy through the API: every test image over HTTP, single and batched, against the card" 100 40 \
        $PY -m benchmarks.api_accuracy --weights "$CHECKPOINT" --data-dir .cache/cifar10 --skip-integrity-check \
            --ready-timeout 60 --out "$WORK/api_accuracy.json" "${API_ARGS[@]}"
fi

# SERVE_LIMIT_S: the sweeps' own limit (device seconds, x4 in a rehearsal); the rehearsal's rerun sets it low to see
# a step stopped while its service runs.
step "serving sweeps" "${SERVE_LIMIT_S:-240}" 30 \
    $PY -m benchmarks.gpu.serve_gpu --weights "$SERVED" --out "$WORK/serve.json" --log-dir "$WORK/logs" \
        "${SERVE_ARGS[@]}"

stop_leftover_services
stamp "done; steps not ok: ${#NOT_OK[@]}"
printf '  %s\n' "${NOT_OK[@]}"
summarise
ls -l "$OUT"
(( ${#NOT_OK[@]} == 0 ))
