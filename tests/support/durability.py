"""Recording what ``model.durable`` fsyncs, to check that a write reached the disk before its rename."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import model.durable


@dataclass
class FsyncLog:
    """Every path fsynced, in order, and every rename, as ("rename", source, target)."""

    events: list[tuple[str, ...]] = field(default_factory=list)

    def synced(self) -> list[Path]:
        return [Path(event[1]) for event in self.events if event[0] == "fsync"]

    def renamed_to(self) -> list[Path]:
        return [Path(event[2]) for event in self.events if event[0] == "rename"]

    def durably_replaced(self, path: Path) -> bool:
        """``path`` got its data fsynced under a temporary name before the rename onto it, and its directory
        fsynced after."""
        for index, event in enumerate(self.events):
            if event[0] == "rename" and Path(event[2]) == path:
                source = event[1]
                before = any(e == ("fsync", source) or (e[0] == "fsync" and Path(source) in Path(e[1]).parents)
                             for e in self.events[:index])
                after = ("fsync", str(path.parent)) in self.events[index + 1:]
                return before and after
        return False


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> FsyncLog:
    log = FsyncLog()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        log.events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source: os.PathLike[str] | str, target: os.PathLike[str] | str) -> None:
        log.events.append(("rename", str(Path(source).resolve()), str(Path(target).resolve())))
        real_replace(source, target)

    monkeypatch.setattr(model.durable.os, "fsync", fsync)
    monkeypatch.setattr(model.durable.os, "replace", replace)
    return log
