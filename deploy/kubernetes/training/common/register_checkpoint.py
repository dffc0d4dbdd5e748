"""Register a training Job's checkpoint in the model registry, so the service can serve it.

The last step of the training Jobs (deploy/kubernetes/training/*/job.yaml), run in the same image after
`torchrun -m training` has written ``RUN_DIR/checkpoint/``::

    python register_checkpoint.py --registry /var/lib/cifar-serve/registry --run-dir RUN_DIR [--source-job NAME]

It only adds the checkpoint as an immutable version (app/control/registry.py verifies its SHA-256 first); which
version is served stays the operator's decision, ``POST /admin/promote/<version>``, as with
``APP_PROMOTE=never`` for the API's own jobs. Exit codes: 0 registered (or not node 0), 1 no usable
checkpoint (one ``error:`` line), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.control.registry import ModelRegistry
from model.card import CheckpointError
from training.run import CHECKPOINT_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="register_checkpoint.py", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, required=True, help="the model registry (APP_REGISTRY_DIR)")
    parser.add_argument("--run-dir", type=Path, required=True, help="the training run's --run-dir")
    parser.add_argument("--source-job", help="recorded in the version's registration.json")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="this pod's node rank in a multi-node run; only node 0, whose rank 0 wrote the "
                             "checkpoint, registers it (default 0)")
    args = parser.parse_args(argv)
    if args.node_rank != 0:
        print(f"node {args.node_rank}: nothing to register, node 0 registers the run's checkpoint")
        return 0
    checkpoint = args.run_dir / CHECKPOINT_DIR
    try:
        model = ModelRegistry(args.registry).register(checkpoint, source_job=args.source_job)
    except (CheckpointError, OSError) as error:
        print(f"error: cannot register {checkpoint}: {error}", file=sys.stderr)
        return 1
    accuracy = model.card.test_accuracy
    print(f"registered {model.version} (final-epoch test accuracy "
          f"{'unknown' if accuracy is None else f'{accuracy:.4f}'}); to serve it: curl -X POST "
          f"http://cifar-serve:8000/admin/promote/{model.version} -H \"Authorization: Bearer $APP_ADMIN_TOKEN\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
