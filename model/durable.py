"""Atomic and durable file writes: the one place every checkpoint, card, state and pointer write goes through.

``os.replace`` alone is atomic but not durable: after a power cut the rename can be on disk while the file's
data is not, leaving a zero-length ``card.json`` or ``current`` (ext4's default ``data=ordered`` narrows this
window, XFS and most network filesystems do not). So the new file's data is fsynced before the rename, and
its directory after it, so the rename itself survives too. Lives in ``model/`` because ``model/`` may import
neither ``app/`` nor ``training/``, and all three write files this way.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable. A no-op where directories cannot be opened
    (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_durably(temporary: Path, path: Path) -> None:
    """Move a fully written ``temporary`` (a file or a directory of files) onto ``path``: its data first
    reaches the disk, then the rename, then the directory entry."""
    temporary, path = Path(temporary), Path(path)
    if temporary.is_dir():
        for child in temporary.iterdir():
            if child.is_file():
                fsync_file(child)
        fsync_directory(temporary)
    else:
        fsync_file(temporary)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a reader, or the disk after a crash, sees the old file or the new
    one, never a torn one. A new file gets the usual mode (0666 less the umask), so a container's other UID
    can read it. On failure (a full disk) the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
