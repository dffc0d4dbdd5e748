import errno
import os

import pytest

from model.durable import replace_durably, write_atomically
from tests.support.durability import record_fsyncs


def test_a_write_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    log = record_fsyncs(monkeypatch)
    target = tmp_path.resolve() / "card.json"
    write_atomically(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert log.durably_replaced(target)
    assert list(tmp_path.iterdir()) == [target]


def test_a_new_file_gets_the_usual_mode_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "model.safetensors", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "current"
    target.write_text("old\n")

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("model.durable.os.fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, "new\n")
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]


def test_a_directory_is_replaced_with_its_files_synced(tmp_path, monkeypatch):
    log = record_fsyncs(monkeypatch)
    staging = tmp_path.resolve() / ".staging"
    staging.mkdir()
    (staging / "a").write_text("a")
    replace_durably(staging, tmp_path.resolve() / "version")
    assert log.synced()[:2] == [staging / "a", staging]
    assert log.durably_replaced(tmp_path.resolve() / "version")
