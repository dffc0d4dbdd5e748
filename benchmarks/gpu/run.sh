#!/usr/bin/env bash
# The GPU run (issue 7), one prepared script for the device machine, run from the repository root:
#   bash benchmarks/gpu/run.sh            # on the GPU machine, with .whl and .gpu-data carried
#   DRY_RUN=1 bash benchmarks/gpu/run.sh  # here, on the CPU, with tiny settings, to check every step
# Writes at most 8 files into $OUT: log.txt, results.json (training, serving, accuracy through the API and
# the run's own CUDA backend verification, fp32 against bf16 autocast on the whole test set, which
# `python -m training` does after its last epoch), card.json, weights_manifest.json and the fp16 weights in
# parts of at most 15 MiB (3 for ResNet-50).
#
# Before the call, here:  echo /.whl/ >> .git/info/exclude; echo /.gpu-data/ >> .git/info/exclude;
#   pip download the wheels the device lacks into .whl (device README's flags; fastapi, starlette, uvicorn,
#   pydantic, pydantic-core, pydantic-settings, python-multipart, annotated-types, typing-inspection,
#   python-dotenv, httptools, annotated-doc) and cp -r ../shared/cifar10/compact .gpu-data/
# The call:  run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpu-data"], timeout_s=570)
# After it, here:  python benchmarks/gpu/weights_parts.py join FILES_AT weights/resnet50   (SHA-256 checked)
#   .venv/bin/python -m training --eval-only --weights weights/resnet50 --data-dir .cache/cifar10 \
#       --skip-integrity-check       # must match the GPU's final-epoch accuracy within 0.1 points
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
# The GPU machine's own python3 has torch; here the dry run uses the project's venv, as the README sets it up.
if [ -n "${DRY_RUN:-}" ] && [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
WORK=${WORK:-/tmp/gpu-run}
rm -rf "$WORK" && mkdir -p "$WORK"
started=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - started )) s: $*"; }

stamp "environment"
if [ -d .whl ] && [ -z "${DRY_RUN:-}" ]; then  # the wheels are for the GPU machine's Python 3.12
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, torchvision, fastapi, uvicorn, pydantic_settings; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

stamp "CIFAR-10 from the compact bundle"
COMPACT=${COMPACT:-.gpu-data/compact}
[ -d "$COMPACT" ] || COMPACT=../shared/cifar10/compact
if [ ! -f .cache/cifar10/cifar-10-batches-py/test_batch ]; then
    $PY "$COMPACT/unpack.py" --out .cache/cifar10 || exit 1
fi

if [ -n "${DRY_RUN:-}" ]; then
    TRAIN_ARGS=(--arch resnet18 --epochs 2 --warmup-epochs 0.5 --batch-size 32 --train-limit 256 --test-limit 128 --no-plots)
    SERVE_ARGS=(--offline-batches 1 8 --offline-seconds 0.5 --concurrency 1 8 --workers 1 2 --duration 2
                --batch-files 8)
else
    TRAIN_ARGS=(--compile)
    SERVE_ARGS=()
fi

stamp "GPU-marked tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/app/engine/test_engine_gpu.py tests/training/test_gpu.py

stamp "training throughput (eager, 30 steps)"
$PY -m benchmarks.train_throughput --no-save $([ -n "${DRY_RUN:-}" ] && echo "--arch resnet18 --batch-size 16 --steps 2 --warmup-steps 1")

stamp "training the default recipe ${TRAIN_ARGS[*]}"
$PY -m training --data-dir .cache/cifar10 --skip-integrity-check --run-dir "$WORK/run" \
    --weights-dtype float16 "${TRAIN_ARGS[@]}" || exit 1

stamp "serving benchmark"
$PY -m benchmarks.gpu.serve_gpu --weights "$WORK/run/checkpoint" --out "$WORK/serve.json" "${SERVE_ARGS[@]}"

stamp "accuracy through the API: every test image over HTTP, single and batched, against the card"
$PY -m benchmarks.api_accuracy --weights "$WORK/run/checkpoint" --data-dir .cache/cifar10 --skip-integrity-check \
    --concurrency 64 --out "$WORK/api_accuracy.json" $([ -n "${DRY_RUN:-}" ] && echo "--test-limit 64 --tolerance 100")

stamp "collecting results"
$PY -m benchmarks.gpu.summarise --run "$WORK/run" --serve "$WORK/serve.json" --api-accuracy "$WORK/api_accuracy.json" \
    --out "$OUT/results.json" \
    --wall-seconds $(( $(date +%s) - started ))
$PY benchmarks/gpu/weights_parts.py split "$WORK/run/checkpoint" "$OUT"
sha256sum "$OUT"/*
stamp "done"
