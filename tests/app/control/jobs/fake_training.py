"""A stand-in for ``python -m training`` that speaks its run-directory contract without importing torch:
epoch lines in metrics.jsonl, a copied checkpoint, a final line, ``error:`` on stderr with exit 2, and a
prompt exit on SIGTERM. Lets the runner's tests take a fraction of a second each."""

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("run_dir", type=Path)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--epoch-seconds", type=float, default=0.05)
parser.add_argument("--checkpoint", type=Path, help="checkpoint directory to copy as this run's result")
parser.add_argument("--accuracy", type=float, default=0.5)
parser.add_argument("--error", help="fail at start-up with this error line, like a missing dataset")
parser.add_argument("--ignore-sigterm", action="store_true")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else lambda *_: sys.exit(143))
if args.error:
    print(f"error: {args.error}", file=sys.stderr)
    sys.exit(2)
args.run_dir.mkdir(parents=True, exist_ok=True)
state = args.run_dir / "state.pt"
first = int(state.read_text()) + 1 if args.resume and state.exists() else 1
print(f"training from epoch {first}", flush=True)
with open(args.run_dir / "metrics.jsonl", "a") as metrics:
    for epoch in range(first, args.epochs + 1):
        time.sleep(args.epoch_seconds)
        event = {"event": "epoch", "epoch": epoch, "epochs": args.epochs, "train_loss": 2.0 / epoch,
                 "train_accuracy": 0.1 * epoch, "test_accuracy": 0.1 * epoch, "images_per_s": 100.0,
                 "epoch_seconds": args.epoch_seconds, "eta_s": args.epoch_seconds * (args.epochs - epoch),
                 "time": time.time()}
        metrics.write(json.dumps(event) + "\n")
        metrics.flush()
        # Atomically, as the real training writes state.pt: a SIGTERM mid-write must not leave it empty.
        state.with_suffix(".tmp").write_text(str(epoch))
        state.with_suffix(".tmp").replace(state)
    checkpoint = args.run_dir / "checkpoint"
    if args.checkpoint:
        shutil.copytree(args.checkpoint, checkpoint, dirs_exist_ok=True)
    metrics.write(json.dumps({"event": "final", "test_accuracy": args.accuracy, "test_accuracy_tta": None,
                              "per_class_accuracy": {}, "train_seconds": 1.0, "checkpoint": str(checkpoint)}) + "\n")
