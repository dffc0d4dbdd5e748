"""``create_app(settings)`` builds a serving replica (the data plane); its lifespan owns the engine, the
classifier, the model, the registry follower and, on one machine, the control plane's supervised process.

The replica only reads the registry: training jobs and promotion are the control plane's, a process of its
own (``app/control/service.py``). Unless ``APP_CONTROL_URL`` names one elsewhere (or ``APP_RUN_JOBS=false``
says none runs here), the lifespan starts it as a supervised child (``app/control/supervisor.py``); either way
the job API and promotion are forwarded to it (``app/api/forward.py``). Nothing the control plane does, or
fails to do, stops this process from starting or answering.

Start-up does not wait for the model: the process answers ``/healthz`` at once, loads and warms up
``APP_WEIGHTS`` in the background, and reports ready on ``/readyz`` only after that. Without a checkpoint
at ``APP_WEIGHTS`` it keeps running with no model, and ``/predict`` answers 503 saying how to get one.
Shutdown (SIGTERM under uvicorn) stops taking requests and finishes the ones in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.clients import ClientBackoffGate
from app.api.errors import install_error_handlers
from app.api.forward import ControlForward, ControlLink
from app.api.middleware import AdminGate, RequestContextMiddleware, UploadBudget, UploadBudgetGate
from app.api.openapi import install_openapi
from app.api.routes import admin, explain, health, model_info, predict, promotion, registry, train, v2, web
from app.classification.classifier import Classifier
from app.classification.explanations import Explainer
from app.classification.images import pillow_pixel_limit
from app.config import Settings
from app.control.follower import RegistryFollower, RegistryMetrics
from app.control.plane import InitialModel, initial_model
from app.control.registry import ModelRegistry
from app.control.supervisor import ControlSupervisor, supervises_control_plane
from app.engine.backend_choice import BackendPolicy
from app.engine.device import apply_thread_plan, plan_threads, resolve_batch_size, resolve_device
from app.engine.engine import InferenceEngine
from app.engine.errors import ServiceStopping, SwapFailed, SwapTimedOut
from app.engine.self_verification import start_backend_verification
from app.logging import configure_logging
from app.service_metrics import ServiceMetrics
from model.card import CheckpointError, checkpoint_files

logger = logging.getLogger(__name__)

HOW_TO_GET_A_MODEL = ("train one with `python -m training` (it writes a checkpoint directory), or set APP_WEIGHTS "
                      "to a checkpoint directory (model.safetensors + card.json); then restart the service or "
                      "POST /admin/reload")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    app = FastAPI(
        title="cifar-serve",
        version=__version__,
        summary="CIFAR-10 image classification behind a dynamic-batching inference engine",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.control_link = link = ControlLink(control_url(settings), _no_control_plane(settings))
    install_error_handlers(app)
    # The last one added runs first: the request context wraps the gate, so its refusals are counted and
    # logged, and the gate wraps the forward, so no request reaches the control plane without the token.
    app.add_middleware(ControlForward, link=link, routes=[*train.router.routes, *promotion.router.routes],
                       max_body_bytes=settings.max_json_bytes)
    app.add_middleware(AdminGate, settings=settings, prefixes=(admin.router.prefix, train.router.prefix))
    budget = UploadBudget(settings.max_upload_bytes_in_flight)
    app.state.metrics.track_uploads(lambda: budget.held)
    app.add_middleware(UploadBudgetGate, budget=budget, max_body=max(settings.max_upload_bytes,
                                                                     settings.max_json_bytes))
    app.add_middleware(ClientBackoffGate, settings=settings)  # before the upload budget: it costs nothing
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    for routes in (predict, explain, health, model_info, admin, v2, web, registry):
        app.include_router(routes.router)
    # Served by the control plane (ControlForward answers them before any route runs); included here so the
    # OpenAPI document describes every route a client reaches at this address.
    app.include_router(train.router)
    app.include_router(promotion.router)
    install_openapi(app, settings)
    return app


def control_url(settings: Settings) -> str | None:
    """Where this replica forwards the job API and promotions; None when no control plane is reachable."""
    if settings.control_url is not None:
        return settings.control_url
    return f"http://127.0.0.1:{settings.control_port}" if settings.run_jobs else None


def _no_control_plane(settings: Settings) -> str:
    where = settings.jobs_url or "the control plane (python -m app.control), and set APP_CONTROL_URL to its address"
    return (f"this replica does not run training jobs (APP_RUN_JOBS=false and no APP_CONTROL_URL); send training "
            f"requests to {where}")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    device = resolve_device(settings.device)
    plan = plan_threads(device, settings.torch_threads, settings.parallel_batches, settings.decode_threads)
    apply_thread_plan(plan)
    engine = InferenceEngine(
        device,
        max_batch_size=resolve_batch_size(device, settings.max_batch_size),
        max_batch_delay_s=settings.max_batch_delay_ms / 1000,
        max_queue=settings.max_queue,
        parallel_batches=plan.parallel_batches,
        single_image_reserve=settings.resolved_single_image_reserve,
        max_client_images=settings.max_client_images,
        swap_timeout_s=settings.swap_timeout_s,
        backend_policy=BackendPolicy(settings.cpu_backend, settings.cuda_precision, settings.max_accuracy_drop,
                                     data_dir=settings.data_dir),
        observer=app.state.metrics,
    )
    app.state.metrics.track_queue(lambda: engine.queued_images)
    classifier = Classifier(engine, decode_threads=plan.decode_threads, max_image_pixels=settings.max_image_pixels,
                            calibrated=settings.calibration == "on", max_decode_queue=settings.max_decode_queue)
    explainer = Explainer(engine, concurrency=settings.explain_concurrency, max_image_pixels=settings.max_image_pixels,
                          calibrated=settings.calibration == "on")
    app.state.engine, app.state.classifier, app.state.explainer = engine, classifier, explainer
    await engine.start()
    app.state.backend_verification = verification = start_backend_verification(engine, settings.state_dir,
                                                                                settings.cpu_backend)
    supervisor = ControlSupervisor(settings) if supervises_control_plane(settings) else None
    if supervisor is not None:
        supervisor.start()
    app.state.control_supervisor = supervisor
    link: ControlLink = app.state.control_link
    link.open()
    follower = RegistryFollower(settings.registry_path, engine, settings.registry_poll_s,
                                RegistryMetrics(app.state.metrics.registry))
    app.state.follower = follower
    registry = await asyncio.to_thread(_registry_or_none, follower)
    app.state.initial_model = choice = await asyncio.to_thread(initial_model, registry, settings.weights,
                                                               settings.shipped_weights)
    await asyncio.to_thread(follower.note_start_up)
    link.on_promoted = follower.check
    loading = start_loading(engine, choice)
    follower.start()
    grpc_server = None
    try:
        # The KServe v2 gRPC server (app/grpc), on this event loop and this engine; loaded only when enabled.
        if settings.grpc_port:
            from app.grpc.server import GrpcServer

            grpc_server = await GrpcServer.start(settings, engine, classifier, app.state.metrics.registry)
        with pillow_pixel_limit(settings.max_image_pixels):
            yield
    finally:
        if grpc_server is not None:  # before the engine: its calls in progress finish on it
            await grpc_server.stop(grace_s=settings.request_timeout_s)
        if loading is not None:
            loading.cancel()
        await verification.close()
        await follower.close()
        await link.close()
        if supervisor is not None:  # a running training job is stopped and marked interrupted, never orphaned
            await asyncio.to_thread(supervisor.stop)
        await engine.stop(timeout=settings.request_timeout_s)
        classifier.close()
        explainer.close()


def _registry_or_none(follower: RegistryFollower) -> ModelRegistry | None:
    try:
        return follower.registry()
    except OSError as error:  # the follower reports it and keeps trying; the replica starts without it
        logger.error("the model registry under %s cannot be opened (%s); starting without it", follower.root, error)
        return None


def _public_cause(error: Exception) -> str:
    """Why a checkpoint could not be served, as every caller of /readyz and /predict may read it (issue 22):
    a checkpoint's or a swap's own account of what is wrong, but not the text of another exception a swap
    wraps (a torch or ONNX error, which can name this machine's files), which stays in the log and in the
    admin's answer to POST /admin/reload."""
    if isinstance(error, (CheckpointError, SwapTimedOut, ServiceStopping)):
        return str(error)
    if isinstance(error, SwapFailed):
        return "its backend failed to build or warm up; the service log has the error"
    return "an unexpected error; the service log has it"


def start_loading(engine: InferenceEngine, choice: InitialModel) -> asyncio.Task[None] | None:
    """Load the chosen checkpoint in the background if there is one; otherwise say, on every request from
    the first one on, how to get one."""
    weights = choice.path
    if weights is None or not checkpoint_files(weights)[1].is_file():
        where = choice.origin if weights is None else f"there is no checkpoint at {weights} ({choice.origin})"
        engine.unavailable_reason = f"no model is loaded: {where}; {HOW_TO_GET_A_MODEL}"
        logger.warning(engine.unavailable_reason)
        return None
    logger.info("serving %s: %s", weights, choice.origin)
    engine.unavailable_reason = f"the model at {weights} is loading and warming up; retry in a few seconds"
    return asyncio.create_task(_load_initial_model(engine, choice), name="initial-model")


async def _load_initial_model(engine: InferenceEngine, choice: InitialModel) -> None:
    """Serve the chosen checkpoint, else its fallback (the registry's previous version), else nothing."""
    attempt: InitialModel | None = choice
    while attempt is not None and attempt.path is not None:
        try:
            await engine.swap(attempt.path, origin=attempt.origin)
            return
        except Exception as error:  # a bad checkpoint must not stop the service: /admin/reload can still fix it
            engine.unavailable_reason = (f"no model is loaded: the checkpoint at {attempt.path} could not be "
                                         f"served ({_public_cause(error)}); {HOW_TO_GET_A_MODEL}")
            logger.error("no model is loaded: the checkpoint at %s could not be served: %s", attempt.path, error,
                         exc_info=True)
            attempt = attempt.fallback
            if attempt is not None and attempt.path is not None:
                logger.warning("falling back to %s: %s", attempt.path, attempt.origin)
