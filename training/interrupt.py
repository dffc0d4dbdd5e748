"""SIGTERM and SIGINT stop a run promptly: the handler raises Interrupted, the run records the stop in
metrics.jsonl, and the process exits 128 + the signal number. Nothing is saved on the way out, so a kill can't
leave a half-written file: --resume continues from the last state.pt, written at an epoch boundary."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(BaseException):
    """A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way up swallows it."""

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        super().__init__(signal.Signals(signal_number).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


@contextmanager
def stop_on_signals() -> Iterator[None]:
    def raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
        raise Interrupted(signal_number)

    previous = {number: signal.signal(number, raise_interrupted) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
