"""RUN/metrics.jsonl and the human log line per epoch.

One JSON object per line, each with an ``"event"`` ("start", "epoch", "resumed", "interrupted", "backends",
"final", "evaluation", "calibration"), written and flushed as it happens, so another process (the service's
job runner) can follow a run by reading the file. Accuracies are fractions in 0..1; null means "not measured
at this point".
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO


class MetricsLog:
    def __init__(self, path: Path | None, *, truncate_to: int | None = None) -> None:
        """Append to ``path`` (None: a log that writes nothing, for the non-zero ranks of a torchrun job).
        ``truncate_to`` first cuts the file back to the length recorded in state.pt, dropping the lines of
        epochs that a resumed run is about to redo."""
        self._file: TextIO | None = None
        if path is None:
            return
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as handle:
                handle.truncate(truncate_to)
        self._file = open(path, "a", encoding="utf-8")

    @property
    def offset(self) -> int:
        return self._file.tell() if self._file else 0

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **fields, "time": datetime.now(UTC).isoformat(timespec="seconds")}
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file:
            self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _percent(value: float | None) -> str:
    return "   -   " if value is None else f"{100 * value:6.2f}%"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def epoch_log_line(record: dict[str, Any]) -> str:
    """One line per epoch for people: loss, accuracy, throughput and time."""
    line = (f"epoch {record['epoch']:>3}/{record['epochs']}  loss {record['train_loss']:.4f}  "
            f"train acc {_percent(record['train_accuracy'])}  test acc {_percent(record['test_accuracy'])}")
    if "validation_accuracy" in record:
        line += f"  val acc {_percent(record['validation_accuracy'])}"
    return line + (f"  {record['images_per_s']:>8,.0f} img/s  {record['epoch_seconds']:6.2f} s  "
                   f"eta {_duration(record['eta_s'])}")
