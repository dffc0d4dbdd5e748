"""Following a run's ``metrics.jsonl``: progress comes from these structured lines, never from log text."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

from app.control.jobs.schemas import JobProgress

logger = logging.getLogger(__name__)


class MetricsFollower:
    """Keeps the latest epoch event and the final event of a run's metrics file.

    Each poll reads only what was appended since the last one (the runner polls every 250 ms, on the event
    loop). A resumed run first cuts the file back to the length recorded in its training state, then appends
    again: the follower notices because the last line it read is no longer where it was, and starts over from
    the beginning. A line still being written (no newline yet) is left for the next poll.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_epoch: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self._offset = 0           # bytes of complete lines read so far
        self._last_line = b""      # the last complete line read, which ends at _offset

    def poll(self) -> bool:
        """Read the new events; True if the latest epoch changed."""
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return False
        before = self.last_epoch
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size < self._offset or not self._unchanged_up_to_offset(handle):
                self.last_epoch, self.final, self._offset, self._last_line = None, None, 0, b""
            handle.seek(self._offset)
            data = handle.read(max(0, size - self._offset))
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines(keepends=True):
            self._read(line)
            self._last_line = line
        self._offset += len(complete)
        return self.last_epoch != before

    def _unchanged_up_to_offset(self, handle: BinaryIO) -> bool:
        if not self._last_line:
            return True
        handle.seek(self._offset - len(self._last_line))
        return handle.read(len(self._last_line)) == self._last_line

    def _read(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("skipping a line of %s that is not JSON: %r", self.path, line[:200])
            return
        if isinstance(event, dict) and event.get("event") == "epoch":
            self.last_epoch = event
        elif isinstance(event, dict) and event.get("event") == "final":
            self.final = event

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
