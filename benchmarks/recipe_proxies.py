"""Short training runs on a holdout split, to choose a recipe without looking at the test set.

    .venv/bin/python -m benchmarks.recipe_proxies --data-dir data --skip-integrity-check \\
        --run "fastcnn=--arch fastcnn --epochs 4 --warmup-epochs 1 --lr 0.5 --norm-lr-scale 64 ..." \\
        --run "resnet20=--arch resnet20 --epochs 8 ..."

Every run is `python -m training` on the first ``--train-images`` training images, of which the last
``--holdout`` are held out and reported as validation accuracy; the test set is cut to one image, so no
choice made from these figures has seen it. Each run's options follow its name; options common to all runs
(``--batch-size``, precision) are given once with ``--common``. The runs go one after another in this process's
order and the table of validation accuracy, training seconds and images/s is printed and written to
``benchmarks/results/recipe_proxies_<label>.json`` with each run's config.json and metrics.jsonl records.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.serve_load import describe_machine
from training.metrics import read_metrics
from training.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def run_one(name: str, options: list[str], common: list[str], data_dir: Path, skip_check: bool,
            train_images: int, holdout: int, work: Path) -> dict:
    run_dir = work / name
    argv = [sys.executable, "-m", "training", "--data-dir", str(data_dir), "--run-dir", str(run_dir),
            "--train-limit", str(train_images), "--holdout", str(holdout), "--test-limit", "1", "--no-plots",
            "--no-tta", *(["--skip-integrity-check"] if skip_check else []), *common, *options]
    completed = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"run {name} failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    records = read_metrics(run_dir / "metrics.jsonl")
    final = records[-1]
    epochs = [r for r in records if r["event"] == "epoch"]
    return {
        "name": name, "options": options, "validation_accuracy": final["validation_accuracy"],
        "train_seconds": round(final["train_seconds"], 1),
        "images_per_s": round(sum(r["images_per_s"] for r in epochs) / len(epochs), 1),
        "config": json.loads((run_dir / "config.json").read_text())["config"], "metrics": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--skip-integrity-check", action="store_true", help="for rebuilt copies (see training)")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=OPTIONS",
                        help="one proxy run: a name, '=', and its `python -m training` options")
    parser.add_argument("--common", default="", help="options added to every run (default: none)")
    parser.add_argument("--train-images", type=int, default=25_000, help="default %(default)s")
    parser.add_argument("--holdout", type=int, default=5_000, help="default %(default)s")
    parser.add_argument("--label", required=True, help="names the result file")
    args = parser.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory(prefix="recipe_proxies-") as work:
        for spec in args.run:
            name, _, options = spec.partition("=")
            result = run_one(name, shlex.split(options), shlex.split(args.common), args.data_dir,
                             args.skip_integrity_check, args.train_images, args.holdout, Path(work))
            print(f"{name:<16} validation {100 * result['validation_accuracy']:6.2f} %   "
                  f"{result['train_seconds']:7.1f} s of training   {result['images_per_s']:6.1f} images/s",
                  flush=True)
            runs.append(result)
    record = {"benchmark": "recipe_proxies", "machine": describe_machine(), "train_images": args.train_images,
              "holdout": args.holdout, "runs": runs,
              "command": " ".join(["python -m benchmarks.recipe_proxies", *map(shlex.quote, argv or sys.argv[1:])]),
              "git_commit": git_commit(), "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    path = RESULTS / f"recipe_proxies_{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
