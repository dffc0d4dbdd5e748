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

A version is assembled in a temporary directory and renamed into place, so ``versions/`` never holds half a
version; ``current`` is written to a temporary file and renamed (``model.durable``: data, rename and
directory fsynced), so a reader sees the old pointer or the new one, never a torn one, even after a crash.
``prune`` deletes the oldest versions beyond a count, never ``current`` or ``previous``. The version name is
the card's ``.version`` (architecture + weights hash), so registering the same weights twice yields the same
version rather than a duplicate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from model.backend_report import report_file
from model.calibration_set import CALIBRATION_FILE
from model.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ModelCard,
    check_finite_weights,
    file_sha256,
    read_card,
)
from model.durable import replace_durably, write_atomically

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
# What a checkpoint directory may hold beside its weights and card, measured on those weights: without them a
# registered version, and so every reload and promotion, lost APP_CPU_BACKEND=auto's verified backend (it
# served the exact fused instead) and int8 its calibration images. Each names the weights' SHA-256 inside,
# and its reader refuses a mismatch, so they need no line in SHA256SUMS.
COMPANION_FILES = (report_file("cpu"), report_file("cuda"), CALIBRATION_FILE)


class UnknownVersion(LookupError):
    def __init__(self, version: str) -> None:
        super().__init__(f"no model version {version!r} in the registry; GET /models lists the versions")
        self.version = version


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
            _copy_missing_companions(Path(checkpoint_dir), final)
            return self.get(card.version)
        staging = self.versions_dir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            shutil.copyfile(weights, staging / WEIGHTS_FILE)
            shutil.copyfile(Path(checkpoint_dir) / CARD_FILE, staging / CARD_FILE)
            _copy_missing_companions(Path(checkpoint_dir), staging)
            card_sha256 = file_sha256(staging / CARD_FILE)
            (staging / "SHA256SUMS").write_text(f"{weights_sha256}  {WEIGHTS_FILE}\n{card_sha256}  {CARD_FILE}\n")
            registration = {"registered_at": datetime.now(UTC).isoformat(), "source_job": source_job}
            (staging / "registration.json").write_text(json.dumps(registration) + "\n")
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
        directory = self.path(version)
        registration = json.loads((directory / "registration.json").read_text())
        return RegisteredModel(version=version, path=str(directory), card=read_card(directory), **registration)

    def path(self, version: str) -> Path:
        """The checkpoint directory of ``version``, loadable with ``model.checkpoint.load_checkpoint``."""
        directory = self.versions_dir / version
        if not _VERSION_NAME.match(version) or not (directory / CARD_FILE).is_file():
            raise UnknownVersion(version)
        return directory

    def versions(self) -> list[RegisteredModel]:
        """Every registered version, newest registration first."""
        found = [self.get(d.name) for d in self.versions_dir.iterdir()
                 if not d.name.startswith(".") and (d / "registration.json").is_file()]
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

    def prune(self, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest registered versions, always keeping ``current`` and ``previous``
        (they may be older); ``keep`` 0 keeps everything. Returns the deleted versions."""
        if keep <= 0:
            return []
        protected = {self.current(), self.previous()}
        deleted = []
        for model in self.versions()[keep:]:
            if model.version in protected:
                continue
            # Renamed out of versions/ first, so no reader ever sees a half-deleted version.
            doomed = self.versions_dir / f".deleting-{uuid.uuid4().hex}"
            os.rename(model.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(model.version)
        return deleted


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
    try:
        version = path.read_text().strip()
    except FileNotFoundError:
        return None
    return version or None
