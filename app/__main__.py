"""``python -m app [--host 127.0.0.1] [--port 8000] [--workers 1]``: the whole service on one machine.

Two planes, two processes: the serving replica (this process, under uvicorn) and the control plane (training
jobs, promotion), which it starts as a supervised child on 127.0.0.1:APP_CONTROL_PORT and forwards the job API
to, unless APP_CONTROL_URL names a control plane elsewhere or APP_RUN_JOBS=false (docs/jobs.md). Each worker
is a process with its own engine and its own copy of the model; on one GPU, one worker batches best; with
several, this process supervises the one control plane they share. Settings come from ``APP_*`` environment
variables (see ``app/config.py``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from app.config import SettingsError, load_settings, unknown_variables
from app.control.supervisor import ControlSupervisor, supervises_control_plane
from app.logging import configure_logging
from app.server import server_options

logger = logging.getLogger("app")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    args = parser.parse_args(argv)
    # The gRPC server listens where HTTP does unless told otherwise; set before the workers start, which inherit it.
    os.environ.setdefault("APP_GRPC_HOST", args.host)
    try:
        settings = load_settings()  # fail here, one line per bad variable, before uvicorn starts workers
    except SettingsError as error:
        sys.exit("\n".join(f"error: {line}" for line in str(error).splitlines()))
    configure_logging(settings.log_level, settings.log_format)
    for warning in unknown_variables():
        logger.warning(warning)
    if (taken := port_problem(args.host, args.port)) is not None:
        sys.exit(f"error: {taken}")
    # The gRPC port is shared by this server's workers (SO_REUSEPORT), so only a check from here tells another
    # server's socket on it from a sibling's.
    grpc_host = settings.grpc_host or args.host
    if settings.grpc_port and port_problem(grpc_host, settings.grpc_port) is not None:
        sys.exit(f"error: the gRPC port {settings.grpc_port} on {grpc_host} is already in use (another server is "
                 "running?): stop it, or set APP_GRPC_PORT to another port (0 for no gRPC server)")
    config = uvicorn.Config("app.main:app", host=args.host, port=args.port, workers=args.workers, log_config=None,
                            access_log=False, timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
                            **server_options(settings))
    # Bind before any start-up work: a second instance on a taken port stops here, before its lifespan
    # stands for job runner or loads a model (uvicorn alone binds one worker's port only after its lifespan).
    listening = config.bind_socket()
    if args.workers > 1:
        # One control plane for all the workers, supervised here; each worker forwards to it.
        supervisor = ControlSupervisor(settings) if supervises_control_plane(settings) else None
        if supervisor is not None:
            os.environ["APP_CONTROL_URL"] = supervisor.url
            supervisor.start()
        try:
            Multiprocess(config, sockets=[listening]).run()
        finally:
            if supervisor is not None:
                supervisor.stop()
        return
    server = uvicorn.Server(config)
    server.run(sockets=[listening])
    if not server.started:
        sys.exit(3)  # uvicorn's own exit status for a failed start-up


def port_problem(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on ``host:port``, in our words, or None."""
    try:
        with socket.create_server((host, port), reuse_port=False):
            return None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return (f"port {port} on {host} is already in use (another server is running?): stop it, or use "
                    f"--port to pick another, e.g. python -m app --port {port + 1}")
        return None  # anything else, uvicorn reports itself


if __name__ == "__main__":
    main()
