"""Start and stop the gRPC server (``GrpcServer.start``, from the app's lifespan): ``grpc.aio`` on the app's own
event loop, so its calls reach the engine as HTTP's requests do, with no thread hop.

- Limits: a message over ``APP_MAX_UPLOAD_BYTES`` is refused by gRPC itself (RESOURCE_EXHAUSTED) from its
  length prefix, before it is read; past ``APP_MAX_CONNECTIONS`` calls in progress, new ones are refused
  (RESOURCE_EXHAUSTED), as HTTP answers 503 past that many connections.
- Health: the standard ``grpc.health.v1.Health`` service, SERVING for the server ("") and for
  ``inference.GRPCInferenceService`` while a model is loaded and warm (``/readyz``), followed every
  ``HEALTH_POLL_S``; NOT_SERVING from the start of shutdown.
- Shutdown: new calls are refused, calls in progress get up to ``APP_REQUEST_TIMEOUT_S`` to finish, then are
  cancelled; the engine stops after that.
- The port is bound with SO_REUSEPORT, so the workers of ``python -m app --workers N`` share it as they share
  the HTTP socket (``python -m app`` refuses a gRPC port that another server holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from app.classification.classifier import Classifier
from app.config import Settings
from app.engine.engine import InferenceEngine
from app.grpc.inference_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from app.grpc.metrics import SERVICE, GrpcMetrics
from app.grpc.service import InferenceService

logger = logging.getLogger(__name__)
HEALTH_POLL_S = 1.0  # how soon the health service follows a model loading or failing


class GrpcServer:
    def __init__(self, server: grpc.aio.Server, health: grpc_health.aio.HealthServicer, engine: InferenceEngine,
                 address: str) -> None:
        self.server = server
        self.health = health
        self.engine = engine
        self.address = address
        self._follower: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, engine: InferenceEngine, classifier: Classifier,
                    registry: CollectorRegistry) -> GrpcServer | None:
        """The server listening on APP_GRPC_HOST:APP_GRPC_PORT; None when APP_GRPC_PORT is 0."""
        if not settings.grpc_port:
            return None
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", settings.max_upload_bytes), ("grpc.so_reuseport", 1)],
            maximum_concurrent_rpcs=settings.max_connections,
        )
        add_GRPCInferenceServiceServicer_to_server(
            InferenceService(settings, engine, classifier, GrpcMetrics(registry)), server)
        health = grpc_health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        host = settings.grpc_host or "127.0.0.1"
        address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as error:
            raise RuntimeError(f"the gRPC server cannot listen on {address} ({error}): set APP_GRPC_PORT to a "
                               "free port, or 0 for no gRPC server") from None
        await server.start()
        running = cls(server, health, engine, address)
        await running._follow_readiness()
        running._follower = asyncio.create_task(running._keep_following(), name="grpc-health")
        logger.info("gRPC server (KServe v2) listening on %s", address)
        return running

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in progress ``grace_s`` to finish, then cancel them."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def _follow_readiness(self) -> None:
        ready = health_pb2.HealthCheckResponse.SERVING if self.engine.ready else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, ready)

    async def _keep_following(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._follow_readiness()
