"""Prometheus metrics of one app instance, in a registry of its own (never prometheus-client's global one,
so two apps in one process, as in the tests, do not share or clash)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

if TYPE_CHECKING:  # only the engine calls model_installed; the control plane's app has these metrics and no torch
    from app.engine.served_model import ServedModel

# Request latencies from a cached CPU answer (~1 ms) to a request timeout (30 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("inference_queue_images", "images waiting for a forward pass",
                                 registry=self.registry)
        self.batch_images = Histogram("inference_batch_images", "images per forward pass",
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        self.forward_seconds = Histogram("inference_forward_seconds", "time of one forward pass, host to host",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.split_batches = Counter("inference_batch_splits_total",
                                     "batches retried in halves after running out of device memory",
                                     registry=self.registry)
        self.dropped_images = Counter("inference_dropped_images_total",
                                      "images never computed: queue_full, deadline, cancelled (the client "
                                      "disconnected), failed, shutdown",
                                      ["reason"], registry=self.registry)
        self.upload_bytes = Gauge("http_upload_bytes_in_flight", "request body bytes reserved by the requests "
                                  "being read (APP_MAX_UPLOAD_BYTES_IN_FLIGHT)", registry=self.registry)
        self.model = Info("model", "the model being served", registry=self.registry)
        self.model_swaps = Counter("model_swaps_total", "models installed, the first one included",
                                   registry=self.registry)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def track_uploads(self, held: Callable[[], int]) -> None:
        self.upload_bytes.set_function(held)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # EngineObserver: called by the engine (batch_split from a device thread; prometheus-client is thread-safe).

    def batch_computed(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.forward_seconds.observe(seconds)

    def batch_split(self) -> None:
        self.split_batches.inc()

    def images_dropped(self, count: int, reason: str) -> None:
        self.dropped_images.labels(reason).inc(count)

    def model_installed(self, model: ServedModel) -> None:
        self.model.info({"version": model.card.version, "architecture": model.card.architecture,
                         "device": str(model.device), "dtype": model.dtype})
        self.model_swaps.inc()
