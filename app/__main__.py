"""``python -m app [--host 127.0.0.1] [--port 8000] [--workers 1]``: run the service under uvicorn.

Each worker is a process with its own engine and its own copy of the model; on one GPU, one worker
batches best. Settings come from ``APP_*`` environment variables (see ``app/config.py``).
"""

from __future__ import annotations

import argparse

import uvicorn

from app.config import Settings
from app.logging import configure_logging
from app.server import server_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    args = parser.parse_args(argv)
    settings = Settings()  # fail here, with pydantic's message, before uvicorn starts workers
    configure_logging(settings.log_level)
    uvicorn.run("app.main:app", host=args.host, port=args.port, workers=args.workers, log_config=None,
                access_log=False, timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
                **server_options(settings))


if __name__ == "__main__":
    main()
