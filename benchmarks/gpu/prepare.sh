#!/usr/bin/env bash
# What the GPU call carries, made here before it (run from anywhere in the checkout):
#   .whl/        the wheels the device lacks, computed by benchmarks/gpu/wheels.py (PyPI is reachable here, not there)
#   .gpu-data/   CIFAR-10's compact bundle, as .gpu-data/compact (run.sh unpacks it there)
# and a check that the working tree plus these stays under the device tool's 64 MiB.
#   PY312=...      a Python 3.12 for wheels.py (default: python3.12 on PATH)
#   CIFAR_COMPACT=...  the bundle's folder (default: shared/cifar10/compact beside the main checkout)
set -euo pipefail
cd "$(dirname "$0")/../.."
# A python3.12 that runs: a pyenv shim is on PATH even where its global version is another one.
PY312=${PY312:-$(for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    "$candidate" -c '' 2>/dev/null && command -v "$candidate" && break; done || true)}
[ -n "$PY312" ] || { echo "error: no python3.12 on PATH; set PY312 to a Python 3.12 (the device's version)"; exit 1; }
"$PY312" benchmarks/gpu/wheels.py

# The main checkout's .git is the common dir of every worktree; shared/ lies beside that checkout.
COMPACT=${CIFAR_COMPACT:-$(git rev-parse --path-format=absolute --git-common-dir)/../../shared/cifar10/compact}
[ -f "$COMPACT/unpack.py" ] || { echo "error: no CIFAR-10 bundle at $COMPACT; set CIFAR_COMPACT"; exit 1; }
# Named destination: `cp -r SRC .gpu-data/` would put the files in .gpu-data itself when it does not exist yet.
rm -rf .gpu-data
mkdir -p .gpu-data
cp -r "$COMPACT" .gpu-data/compact

# What travels: tracked files, untracked ones git does not ignore, and the carried folders.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .gpu-data | tail -1 | cut -f1)
total=$(( tree + carried ))
echo "travels: working tree $(( tree / 1024 )) KiB + .whl and .gpu-data $(( carried / 1024 )) KiB = $(( total / 1048576 )) MiB of 64"
(( total < 64 * 1048576 )) || { echo "error: over the device tool's 64 MiB"; exit 1; }
