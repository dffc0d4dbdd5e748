"""``python -m app.control [--host 127.0.0.1] [--port APP_CONTROL_PORT]``: the control plane alone.

Run it where the control plane lives when the serving replicas run elsewhere (they name it with
``APP_CONTROL_URL``); ``python -m app`` starts it by itself on one machine. One process: the job runner is
elected among control processes by the job database's lock (docs/jobs.md). ``--parent-pid`` (set by
``python -m app``'s supervisor) makes it stop, gracefully, when that process is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

from app.config import SettingsError, load_settings, unknown_variables
from app.logging import configure_logging

logger = logging.getLogger("app.control")



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.control", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1; the "
                        "admin token guards every route that writes, but keep it off public networks)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: APP_CONTROL_PORT, 8001)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        sys.exit("\n".join(f"error: {line}" for line in str(error).splitlines()))
    configure_logging(settings.log_level, settings.log_format)
    for warning in unknown_variables():
        logger.warning(warning)
    if args.parent_pid is not None:  # supervised: its supervisor lowered its priority as it started it
        _stop_when_orphaned(args.parent_pid)
    config = uvicorn.Config("app.control.service:create_control_app", factory=True, host=args.host,
                            port=args.port or settings.control_port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's status for a failed start-up: the supervisor retries after its backoff


def _stop_when_orphaned(parent: int) -> None:
    """SIGTERM this process (a graceful stop: jobs marked interrupted) once ``parent`` is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logger.warning("the serving process %d is gone; stopping the control plane", parent)
        signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


if __name__ == "__main__":
    main()
