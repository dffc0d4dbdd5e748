#!/usr/bin/env bash
# A rehearsal of the GPU call, here, as faithful to the device as a CPU allows (issue 26):
#   bash benchmarks/gpu/rehearse.sh
# 1. prepare.sh: the wheels the device lacks into .whl (from pyproject, resolved for CPython 3.12), CIFAR-10's bundle
#    into .gpu-data, the 64 MiB check.
# 2. A stand-in for the device's Python: a Python 3.12 venv holding the device's own packages at its versions
#    (.whl/device-standin.txt: torch 2.11.0 and torchvision 0.26.0 from PyPI, the same CUDA 13.0 build the device
#    has, numpy 2.5.2, onnxruntime 1.30.0, safetensors 0.8.0, ...) and none of the packages the wheels bring.
# 3. A fresh copy of what travels (tracked files, untracked ones git does not ignore, .whl and .gpu-data) in which
#    run.sh runs whole, with REHEARSAL=1 (only what needs CUDA scaled down), with the stand-in's python3 first on
#    PATH: it installs the wheels offline exactly as on the device, and writes $OUT as there.
# 4. $OUT checked against the device tool's limits (8 files, 16 MiB each, 64 MiB in all).
# 5. A rerun as on the still-warm machine, after a training stopped by its limit (state.pt kept, no checkpoint), with
#    a 32 s limit on the serving sweeps: the resume, a step stopped mid-way and the stopping of its running service.
# 6. The way back: receive.py joins the weights from $OUT, checks every SHA-256 and evaluates them here.
# The log goes to benchmarks/results/gpu/rehearsal-<date>.log. The stand-in (~5 GB) is kept in REHEARSAL_DIR and
# reused; a first build downloads torch's CUDA wheels (about 3 GB, 2 minutes here).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
R=${REHEARSAL_DIR:-/tmp/gpu-rehearsal}
# A python3.12 that runs: a pyenv shim is on PATH even where its global version is another one.
PY312=${PY312:-$(for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    "$candidate" -c '' 2>/dev/null && command -v "$candidate" && break; done || true)}
# The project's own venv, for the way back: this checkout's, else the main checkout's (a worktree has none).
HERE_PY=${HERE_PY:-$REPO/.venv/bin/python}
[ -x "$HERE_PY" ] || HERE_PY=$(git rev-parse --path-format=absolute --git-common-dir)/../.venv/bin/python
[ -n "$PY312" ] || { echo "error: no python3.12 on PATH; set PY312 to a Python 3.12 (the device's version)"; exit 1; }
VENV=$R/venv-py312
mkdir -p "$R" "$REPO/benchmarks/results/gpu"
LOG=$REPO/benchmarks/results/gpu/rehearsal-$(date -u +%Y%m%dT%H%MZ).log
# This machine's pip warns about an absent local index for every package it looks up: noise, left out of the log.
exec > >(grep --line-buffered -v 'is ignored: it is neither a file nor a directory' | tee "$LOG") 2>&1
began=$(date +%s)
phase() { echo "### $(( $(date +%s) - began )) s: $*"; }
echo "rehearsal of benchmarks/gpu/run.sh at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes'), $(date -u +%FT%TZ)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $("$PY312" --version)"
echo "load average at the start (the step times below depend on it): $(cut -d' ' -f1-3 /proc/loadavg)"

phase "prepare: wheels, data, size"
PY312=$PY312 bash benchmarks/gpu/prepare.sh

phase "the device's stand-in: $VENV"
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r .whl/device-standin.txt
# The device lacks every carried package: one left here by an earlier rehearsal's fallback would hide a missing wheel.
mapfile -t carried < <(grep -E '^[a-z0-9-]+==' benchmarks/gpu/wheels.txt | cut -d= -f1)
for name in "${carried[@]}"; do
    if "$VENV/bin/python" -m pip show -q "$name" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall -q -y "$name"
    fi
done
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|torchvision|numpy|pillow|safetensors|onnxruntime|uvloop|httpx|pytest|anyio|typing.extensions) ' \
    | tr -s ' ' | paste -sd ',' | sed 's/^/stand-in: /'

phase "a fresh copy of what travels"
rm -rf "$R/tree" "$R/out" "$R/received"
mkdir -p "$R/tree" "$R/out"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' path; do
    [ -e "$path" ] && printf '%s\0' "$path"
done | tar --null -T - -cf - | tar -xf - -C "$R/tree"
cp -r .whl .gpu-data "$R/tree/"
echo "$(find "$R/tree" -type f | wc -l) files, $(du -sm "$R/tree" | cut -f1) MiB"

phase "run.sh, REHEARSAL=1, in the stand-in"
set +e
(cd "$R/tree" && env -u PYTHONPATH -u VIRTUAL_ENV PATH="$VENV/bin:$PATH" OUT="$R/out" REHEARSAL=1 \
    bash benchmarks/gpu/run.sh > "$R/run.log" 2>&1)
rc=$?
echo "run.sh exited with $rc; its log is \$OUT/log.txt, below"
sed 's/^/    | /' "$R/out/log.txt"

phase "what comes back: \$OUT against the device tool's limits"
"$HERE_PY" - "$R/out" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
files = sorted(path for path in out.rglob("*") if path.is_file())
sizes = {path.name: path.stat().st_size for path in files}
for name, size in sizes.items():
    print(f"  {name:<32} {size / 2 ** 20:6.2f} MiB")
problems = [f"{len(files)} files, more than 8"] if len(files) > 8 else []
problems += [f"{name} over 16 MiB" for name, size in sizes.items() if size > 16 * 2 ** 20]
problems += [f"{name}: a name the tool refuses" for name in sizes if not re.fullmatch(r"[A-Za-z0-9._-]+", name)]
problems += ["more than 64 MiB in all"] if sum(sizes.values()) > 64 * 2 ** 20 else []
results = json.loads((out / "results.json").read_text())
print("steps:")
for step in results.get("steps") or []:
    print(f"  call {step['call']}  {step['seconds']:>5} s  {step['status']:<8} {step['step']}")
problems += [f"step {step['step']!r}: {step['status']}" for step in results.get("steps") or [] if step["status"] != "ok"]
print("problems: " + ("; ".join(problems) if problems else "none"))
sys.exit(1 if problems else 0)
EOF
checked=$?

phase "a rerun on the warm machine: training stopped after its last state.pt, the sweeps stopped by their limit"
# What a second call finds when the first one's training was stopped: .gpu-work/ with state.pt and no checkpoint.
rm -rf "$R/tree/.gpu-work/run/checkpoint" "$R/out-rerun"
mkdir -p "$R/out-rerun"
(cd "$R/tree" && env -u PYTHONPATH -u VIRTUAL_ENV PATH="$VENV/bin:$PATH" OUT="$R/out-rerun" REHEARSAL=1 \
    DEADLINE_S=${RERUN_DEADLINE_S:-150} SERVE_LIMIT_S=8 bash benchmarks/gpu/run.sh > "$R/rerun.log" 2>&1)
rerun=$?
sed 's/^/    | /' "$R/out-rerun/log.txt"
"$HERE_PY" - "$R/out-rerun" "$R/tree/.gpu-work/pids" <<'EOF'
import json, sys
from pathlib import Path
out, pids = Path(sys.argv[1]), Path(sys.argv[2])
steps = {step["step"]: step["status"] for step in json.loads((out / "results.json").read_text())["steps"]
         if step["call"] == 2}
print("rerun steps:", steps)
problems = [] if (out / "weights_manifest.json").is_file() else ["no weights"]
problems += [] if steps.get("training, resumed from the state.pt an earlier call left") == "ok" else ["no resumed training"]
problems += [] if steps.get("serving sweeps") == "timeout" else ["the sweeps' limit did not stop them"]
problems += [f"leftover service {path.name}" for path in pids.glob("*.pid")]
print("rerun problems: " + ("; ".join(problems) if problems else "none"))
sys.exit(1 if problems else 0)
EOF
rerun_checked=$?

phase "the way back: receive.py joins and checks the weights, evaluates them here"
# One test image of the rehearsal's 128 is 0.78 points; the real run's check is on all 10,000 at 0.1 point.
(cd "$R/tree" && env -u PYTHONPATH "$HERE_PY" -m benchmarks.gpu.receive "$R/out" "$R/received" --test-limit 128 \
    --tolerance 1)
received=$?
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
phase "done: run.sh rc $rc, rerun rc $rerun (1 expected: its sweeps were stopped); log $LOG"
exit $(( rc != 0 || checked != 0 || received != 0 || rerun_checked != 0 ))
