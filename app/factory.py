"""``create_app(settings)`` builds the service; its lifespan owns the engine, the classifier and the model.

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
from app.api.errors import install_error_handlers
from app.api.middleware import AdminGate, RequestContextMiddleware, UploadBudget, UploadBudgetGate
from app.api.openapi import install_openapi
from app.api.routes import admin, explain, health, model_info, predict, registry, train, v2, web
from app.classification.classifier import Classifier
from app.classification.explanations import Explainer
from app.classification.images import pillow_pixel_limit
from app.config import Settings
from app.control.plane import InitialModel, initial_model, open_control_plane
from app.engine.backend_choice import BackendPolicy
from app.engine.device import apply_thread_plan, plan_threads, resolve_batch_size, resolve_device
from app.engine.engine import InferenceEngine
from app.logging import configure_logging
from app.service_metrics import ServiceMetrics
from model.checkpoint import checkpoint_files

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
    install_error_handlers(app)
    # The last one added runs first: the request context wraps the gate, so its refusals are counted and logged.
    app.add_middleware(AdminGate, settings=settings, prefixes=(admin.router.prefix, train.router.prefix))
    budget = UploadBudget(settings.max_upload_bytes_in_flight)
    app.state.metrics.track_uploads(lambda: budget.held)
    app.add_middleware(UploadBudgetGate, budget=budget, max_body=max(settings.max_upload_bytes,
                                                                     settings.max_json_bytes))
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    for routes in (predict, explain, health, model_info, admin, v2, web, train, registry):
        app.include_router(routes.router)
    install_openapi(app, settings)
    return app


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
    app.state.control_plane = control_plane = await open_control_plane(settings, engine)
    app.state.initial_model = choice = initial_model(control_plane.registry, settings.weights,
                                                     settings.shipped_weights)
    loading = start_loading(engine, choice)
    control_plane.follow_registry(engine, settings.registry_poll_s)
    try:
        with pillow_pixel_limit(settings.max_image_pixels):
            yield
    finally:
        if loading is not None:
            loading.cancel()
        await control_plane.close()  # a running training job is stopped and marked interrupted, never orphaned
        await engine.stop(timeout=settings.request_timeout_s)
        classifier.close()
        explainer.close()


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
                                         f"served ({error}); {HOW_TO_GET_A_MODEL}")
            logger.error(engine.unavailable_reason, exc_info=True)
            attempt = attempt.fallback
            if attempt is not None and attempt.path is not None:
                logger.warning("falling back to %s: %s", attempt.path, attempt.origin)
