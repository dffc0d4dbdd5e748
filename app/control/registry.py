"""The model registry: immutable, content-addressed model versions and a pointer to the one being served.

Layout under ``APP_REGISTRY_DIR`` (default ``$APP_STATE_DIR/registry``)::

    versions/<version>/model.safetensors   the weights, read-only
    versions/<version>/card.json           the model card (its .version names the directory)
    versions/<version>/SHA256SUMS          both files' SHA-256, in ``sha256sum -c`` format
    versions/<version>/registration.json   when it was registered, and from which training job
    versions/<version>/backends-*.json, calibration.safetensors
                                           the checkpoint's backend reports and int8 calibration set, when
                                           it has them (``COMPANION_FILES``)
    current                                the served version's name, one line
    previous                               the version ``current`` named before, one line: the fallback
    promotion.lock                         flock'ed by whoever promotes, so promotions from several
                                           processes or replicas sharing the folder take turns
    serving/<replica>                      the version each serving replica last said it serves (JSON),
                                           refreshed while it runs, so retention spares it

A version is assembled in a temporary directory and renamed into place, so ``versions/`` never holds half a
version; ``current`` is written to a temporary file and renamed (``model.durable``: data, rename and
directory fsynced), so a reader sees the old pointer or the new one, never a torn one, even after a crash.
``prune`` deletes the oldest versions beyond a count, never ``current``, ``previous`` or one a replica
recently said it serves, and clears the leftovers of interrupted registrations and deletions. The version name is
the card's ``.version`` (architecture + weights hash), so registering the same weights twice yields the same
version rather than a duplicate.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from model.backend_report import report_file
from model.card import (
    CALIBRATION_FILE,
    CARD_FILE,
    STATISTICS_FILE,
    VERIFICATION_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ModelCard,
    check_finite_weights,
    file_sha256,
    read_card,
)
from model.durable import replace_durably, write_atomically

logger = logging.getLogger(__name__)

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SUMS_FILE = "SHA256SUMS"
REGISTRATION_FILE = "registration.json"
PROMOTION_LOCK_FILE = "promotion.lock"
SERVING_FOLDER = "serving"
# A staging or deleting folder older than this was left by a process that died mid-way: a registration
# copies a checkpoint in seconds, so an hour leaves any live one alone.
STALE_LEFTOVER_S = 3600.0
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
# What a checkpoint directory may hold beside its weights and card, measured on those weights: without them a
# registered version, and so every reload and promotion, lost APP_CPU_BACKEND=auto's verified backend (it
# served the exact fused instead) and int8 its calibration images. Each names the weights' SHA-256 inside,
# and its reader refuses a mismatch, so they need no line in SHA256SUMS. The OOD rule's feature statistics
# are named by their SHA-256 in the card, which SHA256SUMS covers.
COMPANION_FILES = (report_file("cpu"), report_file("cuda"), CALIBRATION_FILE, VERIFICATION_FILE, STATISTICS_FILE)


class UnknownVersion(LookupError):
    def __init__(self, version: str) -> None:
        super().__init__(f"no model version {version!r} in the registry; GET /models lists the versions")
        self.version = version


class RegistryError(CheckpointError):
    """Something in the registry folder is not what the registry writes (a damaged version, a pointer that is
    no version name); the message names the path and what to do. A ``CheckpointError``, so the routes answer
    it as one rather than with a 500."""


class PromotionBusy(TimeoutError):
    """Another process held the registry's promotion lock for longer than the wait allows."""


class RegisteredModel(BaseModel):
    version: str
    path: str
    card: ModelCard
    registered_at: datetime
    source_job: str | None = None


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions_dir = root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._pointer = root / "current"
        self._previous = root / "previous"
        self.serving_dir = root / SERVING_FOLDER

    def register(self, checkpoint_dir: Path, *, source_job: str | None = None) -> RegisteredModel:
        """Copy a verified checkpoint into the registry; the version is the card's. Idempotent."""
        card = read_card(checkpoint_dir)
        weights = Path(checkpoint_dir) / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"no weights at {weights}")
        weights_sha256 = file_sha256(weights)
        if weights_sha256 != card.weights_sha256:
            raise CheckpointError(f"{weights} has SHA-256 {weights_sha256}, but its card says "
                                  f"{card.weights_sha256}; the checkpoint was not written completely")
        check_finite_weights(weights)  # a diverged run's NaN weights never become a version anyone can promote
        final = self.versions_dir / card.version
        if final.is_dir():
            if not (problems := self.verify(card.version)):
                _copy_missing_companions(Path(checkpoint_dir), final)
                return self.get(card.version)
            # A damaged copy of these very weights: replaced by this intact one, never trusted again.
            logger.error("registry version %s is damaged (%s); registering it afresh", card.version,
                         "; ".join(problems))
            _remove_out_of_sight(final, self.versions_dir)
        staging = self.versions_dir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            shutil.copyfile(weights, staging / WEIGHTS_FILE)
            shutil.copyfile(Path(checkpoint_dir) / CARD_FILE, staging / CARD_FILE)
            _copy_missing_companions(Path(checkpoint_dir), staging)
            card_sha256 = file_sha256(staging / CARD_FILE)
            (staging / SUMS_FILE).write_text(f"{weights_sha256}  {WEIGHTS_FILE}\n{card_sha256}  {CARD_FILE}\n")
            registration = {"registered_at": datetime.now(UTC).isoformat(), "source_job": source_job}
            (staging / REGISTRATION_FILE).write_text(json.dumps(registration) + "\n")
            for child in staging.iterdir():
                child.chmod(_READ_ONLY)
            replace_durably(staging, final)
        except OSError:
            # Another registration of the same weights won the rename; its copy is identical.
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():
                raise
        return self.get(card.version)

    def get(self, version: str) -> RegisteredModel:
        """A registered version (raises ``UnknownVersion``, or ``RegistryError`` for a damaged one)."""
        directory = self.path(version)
        try:
            registration = json.loads((directory / REGISTRATION_FILE).read_text())
            return RegisteredModel(version=version, path=str(directory), card=read_card(directory), **registration)
        except RegistryError:
            raise
        except (OSError, ValueError, TypeError) as error:  # JSON, UTF-8 and pydantic errors are ValueErrors
            raise RegistryError(f"registry version {version} in {directory} is damaged ({_what(error)}); "
                                "register its checkpoint again, or delete the folder") from None

    def verify(self, version: str) -> list[str]:
        """What is wrong with a registered version's files against its SHA256SUMS (empty: intact)."""
        directory = self.versions_dir / version
        try:
            lines = (directory / SUMS_FILE).read_text().splitlines()
            sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines if line)}
        except (OSError, ValueError) as error:
            return [f"{SUMS_FILE} unreadable: {_what(error)}"]
        problems = []
        for name in (WEIGHTS_FILE, CARD_FILE):
            try:
                actual = file_sha256(directory / name)
            except OSError as error:
                problems.append(f"{name} unreadable: {_what(error)}")
                continue
            if sums.get(name) != actual:
                problems.append(f"{name} does not match its SHA-256 in {SUMS_FILE}")
        return problems

    def path(self, version: str) -> Path:
        """The checkpoint directory of ``version``, loadable with ``model.checkpoint.load_checkpoint``."""
        directory = self.versions_dir / version
        if not _VERSION_NAME.match(version) or not (directory / CARD_FILE).is_file():
            raise UnknownVersion(version)
        return directory

    def versions(self) -> list[RegisteredModel]:
        """Every registered version, newest registration first. Whatever else is in ``versions/`` (a stray
        file, a folder without a card, a damaged version) is left out and logged, so one odd entry cannot
        hide the others or fail ``GET /models``."""
        found = []
        for entry in self.versions_dir.iterdir():
            if entry.name.startswith("."):
                continue  # a registration or deletion in progress
            try:
                found.append(self.get(entry.name))
            except (UnknownVersion, RegistryError) as error:
                logger.warning("skipping %s in the registry: %s", entry, error)
        return sorted(found, key=lambda model: model.registered_at, reverse=True)

    def current(self) -> str | None:
        """The version the service should serve, or None if none was ever promoted."""
        return _read_pointer(self._pointer)

    def previous(self) -> str | None:
        """The version that was current before the current one: what to serve if the current fails to load."""
        return _read_pointer(self._previous)

    def set_current(self, version: str) -> None:
        self.path(version)
        before = self.current()
        if before is not None and before != version:
            write_atomically(self._previous, before + "\n")
        write_atomically(self._pointer, version + "\n")

    def prune(self, keep: int, *, serving_max_age_s: float | None = None) -> list[str]:
        """Delete all but the ``keep`` newest registered versions; ``keep`` 0 keeps everything. Never deleted,
        however old: ``current`` and ``previous``, and every version a replica said it serves within
        ``serving_max_age_s`` (``record_serving``; default ``SERVING_MAX_AGE_S``). Returns the deleted versions.
        Leftovers of registrations and deletions that a dead process interrupted go too."""
        self.clean_leftovers()
        if keep <= 0:
            return []
        protected = {self.current(), self.previous()} | self.serving_versions(serving_max_age_s)
        deleted = []
        for model in self.versions()[keep:]:
            if model.version in protected:
                continue
            _remove_out_of_sight(Path(model.path), self.versions_dir)
            deleted.append(model.version)
        return deleted

    def clean_leftovers(self, older_than_s: float = STALE_LEFTOVER_S) -> list[str]:
        """Delete ``.staging-*`` and ``.deleting-*`` folders in ``versions/`` older than ``older_than_s``
        (a process died while registering or deleting); returns their names."""
        cutoff = time.time() - older_than_s
        cleaned = []
        for entry in self.versions_dir.iterdir():
            if not entry.name.startswith((".staging-", ".deleting-")):
                continue
            try:
                if entry.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            _make_writable(entry)
            shutil.rmtree(entry, ignore_errors=True)
            cleaned.append(entry.name)
        return cleaned

    # -- what the serving replicas serve (their follower calls record_serving while it runs) --

    def record_serving(self, replica_id: str, version: str | None) -> None:
        """Say that replica ``replica_id`` serves ``version`` now (None: none from the registry). A replica
        calls it on every change and at least every ``SERVING_MAX_AGE_S / 3``, so retention (``prune``) never
        deletes a version a replica may still load from or fall back to; a replica that stops calling it is
        forgotten after ``SERVING_MAX_AGE_S``."""
        if not _VERSION_NAME.match(replica_id):
            raise ValueError(f"replica id {replica_id!r} must be letters, digits, '.', '_' or '-'")
        self.serving_dir.mkdir(parents=True, exist_ok=True)
        record = {"version": version, "at": datetime.now(UTC).isoformat(), "pid": os.getpid()}
        write_atomically(self.serving_dir / replica_id, json.dumps(record) + "\n")

    def serving_versions(self, max_age_s: float | None = None) -> set[str]:
        """The versions replicas said they serve within the last ``max_age_s`` (default ``SERVING_MAX_AGE_S``);
        records older than that are from replicas that stopped, and are deleted."""
        max_age_s = SERVING_MAX_AGE_S if max_age_s is None else max_age_s
        if not self.serving_dir.is_dir():
            return set()
        now, versions = time.time(), set()
        for entry in self.serving_dir.iterdir():
            try:
                if now - entry.stat().st_mtime > max_age_s:
                    entry.unlink(missing_ok=True)
                    continue
                version = json.loads(entry.read_text()).get("version")
            except (OSError, ValueError, AttributeError):
                continue  # vanished meanwhile, or half a record from another writer's crash: not a version
            if isinstance(version, str):
                versions.add(version)
        return versions

    def promotion_lock(self) -> PromotionLock:
        """The lock that serialises promotions among every process sharing this registry folder."""
        return PromotionLock(self.root / PROMOTION_LOCK_FILE)


# How long a replica's serving record counts: three missed refreshes of a follower refreshing every 5 minutes.
SERVING_MAX_AGE_S = 900.0


class PromotionLock:
    """An exclusive ``flock`` on ``registry/promotion.lock``: one promotion at a time among all processes whose
    registry is this folder (replicas share it on a volume; flock works across containers on one host and
    on NFSv4, which maps it to its own locks). The kernel drops it when its holder dies, however it dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the lock (blocking: call it in a worker thread from async code);
        raises ``PromotionBusy`` if another process holds it all that time."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise PromotionBusy(f"another process has been promoting a model in {self.path.parent} for "
                                        f"over {timeout_s:g} s (it holds {self.path}); try again later") from None
                time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _copy_missing_companions(checkpoint_dir: Path, version_dir: Path) -> None:
    """Copy into ``version_dir`` the ``COMPANION_FILES`` of ``checkpoint_dir`` it lacks, read-only. So a new
    version gets them all, and one registered before its weights were verified (or on another machine) takes
    them from a later registration of the same weights; a file a version has is never replaced."""
    for name in COMPANION_FILES:
        source, target = checkpoint_dir / name, version_dir / name
        if source.is_file() and not target.exists():
            write_atomically(target, source.read_bytes())
            target.chmod(_READ_ONLY)


def _read_pointer(path: Path) -> str | None:
    """The version a pointer file names, None if there is none. Raises ``RegistryError`` for a pointer that is
    not a version name (bad UTF-8, a stray path) and ``OSError`` when it cannot be read: the caller decides
    whether to retry (a replica keeps serving what it has)."""
    try:
        version = path.read_text().strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise RegistryError(f"the registry pointer {path} is not text; write a version name into it "
                            "(POST /admin/promote/{version} does)") from None
    if version and not _VERSION_NAME.match(version):
        raise RegistryError(f"the registry pointer {path} does not hold a version name; write one into it "
                            "(POST /admin/promote/{version} does)")
    return version or None


def _remove_out_of_sight(directory: Path, versions_dir: Path) -> None:
    """Delete a version folder: renamed out of ``versions/`` first, so no reader ever sees half of it."""
    doomed = versions_dir / f".deleting-{uuid.uuid4().hex}"
    os.rename(directory, doomed)
    _make_writable(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _make_writable(directory: Path) -> None:
    """Registered files are read-only; where the file system enforces that for deletion (not Linux, which
    asks only for a writable directory), make them deletable first."""
    for child in directory.iterdir() if directory.is_dir() else ():
        try:
            child.chmod(stat.S_IRUSR | stat.S_IWUSR)
        except OSError:
            pass


def _what(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return type(error).__name__
