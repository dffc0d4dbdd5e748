"""`python -m training`: exit 0 on success, 2 on a usage error, 1 on an expected failure (missing or corrupt
data, unusable checkpoint or state, no such device, a run that diverged), 128 + N when stopped by signal N.
Expected failures print one line, `error: ...`; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from training.cli import parse_command


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_command(argv)
    # Imported after parsing, so --help and usage errors answer without loading torchvision and matplotlib.
    from model.card import CheckpointError
    from training.data import DatasetError
    from training.distributed import DeviceError
    from training.interrupt import Interrupted, stop_on_signals
    from training.loop import Diverged
    from training.run import TrainingError, run_evaluation, run_training
    from training.state import StateError

    with stop_on_signals():
        try:
            if command.eval_only:
                run_evaluation(command)
            else:
                run_training(command)
        except Interrupted as stop:
            resume = f"; continue with: python -m training --resume --run-dir {command.run_dir}"
            print(f"stopped by {stop.signal_name}{resume if command.run_dir else ''}", file=sys.stderr, flush=True)
            return stop.exit_code
        except (CheckpointError, DatasetError, DeviceError, Diverged, StateError, TrainingError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
