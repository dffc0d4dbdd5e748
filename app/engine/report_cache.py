"""The backend reports the service measured itself, kept in the state folder (``APP_STATE_DIR/backend-reports``).

One file per (weights, machine, libraries): its name is the weights' SHA-256 prefix and a digest of the
machine's identity (the CPU's model name and its features as the ISA masks leave them, ``model.cpu_features``)
and the versions of torch and ONNX Runtime, whose kernels the figures depend on. A restart on the same
machine finds its file and serves the winner at once; another machine, another mask or a new torch finds
none and measures again. Files are written atomically, so a reader sees a whole report or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from model.backend_report import (
    BackendReport,
    BackendReportError,
    MachineIdentity,
    library_versions,
    read_backend_report,
)
from model.durable import write_atomically

logger = logging.getLogger(__name__)

CACHE_FOLDER = "backend-reports"


def cache_key(weights_sha256: str, machine: MachineIdentity, versions: dict[str, str] | None = None) -> str:
    """The file name (without .json) of a report for these weights on this machine with these libraries."""
    versions = library_versions() if versions is None else versions
    identity = json.dumps({"machine": machine.model_dump(mode="json"), "versions": versions}, sort_keys=True)
    return f"{weights_sha256[:16]}-{machine.device_type}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def cached_report_path(cache_dir: Path, weights_sha256: str, machine: MachineIdentity) -> Path:
    return cache_dir / f"{cache_key(weights_sha256, machine)}.json"


def load_cached_report(cache_dir: Path, weights_sha256: str, machine: MachineIdentity) -> BackendReport | None:
    """The report this service measured for these weights on this machine with these libraries, if any."""
    path = cached_report_path(cache_dir, weights_sha256, machine)
    if not path.is_file():
        return None
    try:
        report = read_backend_report(path)
    except BackendReportError as error:  # a damaged cache entry is measured again, not trusted
        logger.warning("ignoring the cached backend report: %s", error)
        return None
    same = (report.weights_sha256 == weights_sha256 and report.machine == machine
            and report.conditions.get("versions") == library_versions())
    return report if same else None


def save_cached_report(cache_dir: Path, report: BackendReport) -> Path:
    path = cached_report_path(cache_dir, report.weights_sha256, report.machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, report.model_dump_json(indent=2) + "\n")
    return path
