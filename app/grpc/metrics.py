"""Prometheus metrics of the gRPC server, by method and status code, in the app's own registry (beside
``app/service_metrics.py``'s HTTP ones, on the same ``/metrics``). The names are the ones gRPC's Prometheus
interceptors (go-grpc-prometheus, py-grpc-prometheus) use, so existing dashboards read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from app.service_metrics import LATENCY_BUCKETS

SERVICE = "inference.GRPCInferenceService"


class GrpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter("grpc_server_handled_total", "gRPC requests completed, by method and status code",
                               ["grpc_service", "grpc_method", "grpc_code"], registry=registry)
        self.latency = Histogram("grpc_server_handling_seconds", "gRPC request latency by method",
                                 ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.handled.labels(SERVICE, method, code).inc()
        self.latency.labels(SERVICE, method).observe(seconds)
