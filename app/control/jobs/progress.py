"""Following a run's ``metrics.jsonl``: progress comes from these structured lines, never from log text."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app.control.jobs.schemas import JobProgress

logger = logging.getLogger(__name__)


class MetricsFollower:
    """Keeps the latest epoch event and the final event of a run's metrics file.

    The whole file is re-read on each poll: it holds one short line per epoch, and a resumed run first cuts it
    back to the length recorded in its training state, which would strand a reader that kept an offset.
    A line still being written (no newline yet) is left for the next poll.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_epoch: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None

    def poll(self) -> bool:
        """Re-read the events; True if the latest epoch changed."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        last_epoch, final = None, None
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("skipping a line of %s that is not JSON: %r", self.path, line[:200])
                continue
            if isinstance(event, dict) and event.get("event") == "epoch":
                last_epoch = event
            elif isinstance(event, dict) and event.get("event") == "final":
                final = event
        changed = last_epoch != self.last_epoch
        self.last_epoch, self.final = last_epoch, final
        return changed

    def progress(self, epochs: int) -> JobProgress:
        if self.last_epoch is None:
            return JobProgress(epoch=0, epochs=epochs)
        return JobProgress.model_validate(
            {"epochs": epochs} | {k: self.last_epoch.get(k) for k in JobProgress.model_fields if k in self.last_epoch}
        )


def tail_lines(path: Path, count: int | None) -> str:
    """The last ``count`` lines of a text file (all of it if None), read from the end so a long log is cheap."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return ""
    with handle:
        if count is None:
            return handle.read().decode("utf-8", errors="replace")
        handle.seek(0, 2)
        position, data = handle.tell(), b""
        # count + 1 newlines: the text may end with one, and the line before the first kept line ends with one.
        while position > 0 and data.count(b"\n") <= count:
            step = min(1 << 16, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    return "".join(lines[-count:]) if count else ""
