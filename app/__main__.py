"""``python -m app [--host 127.0.0.1] [--port 8000] [--workers 1]``: run the service under uvicorn.

Each worker is a process with its own engine and its own copy of the model; on one GPU, one worker
batches best. With APP_RUN_JOBS (the default) every worker stands for job runner and the job database's lock
elects one of them (docs/jobs.md). Settings come from ``APP_*`` environment variables (see ``app/config.py``).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from app.config import Settings
from app.logging import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    args = parser.parse_args(argv)
    settings = Settings()  # fail here, with pydantic's message, before uvicorn starts workers
    configure_logging(settings.log_level)
    config = uvicorn.Config("app.main:app", host=args.host, port=args.port, workers=args.workers, log_config=None,
                            access_log=False, timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    # Bind before any start-up work: a second instance on a taken port stops here, before its lifespan
    # stands for job runner or loads a model (uvicorn alone binds one worker's port only after its lifespan).
    socket = config.bind_socket()
    if args.workers > 1:
        Multiprocess(config, sockets=[socket]).run()
        return
    server = uvicorn.Server(config)
    server.run(sockets=[socket])
    if not server.started:
        sys.exit(3)  # uvicorn's own exit status for a failed start-up


if __name__ == "__main__":
    main()
