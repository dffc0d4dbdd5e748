"""Writing a job's record behind the store's back, as an older or buggy version could have left it."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def poison(database_url: str | None, state_dir: Path, job_id: str, params: str) -> None:
    """Overwrite job ``job_id``'s stored parameters with ``params`` (JSON text) in the store
    ``open_job_store(database_url, state_dir)`` opens."""
    if database_url is None:
        with sqlite3.connect(state_dir / "jobs.db") as db:
            db.execute("UPDATE jobs SET params = ? WHERE id = ?", (params, job_id))
        return
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("UPDATE jobs SET params = %s::jsonb WHERE id = %s", (params, job_id))
