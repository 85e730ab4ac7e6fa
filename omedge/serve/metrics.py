"""Prometheus metrics, one registry per app (two apps in one process, or a Ray replica
beside other code, never share or collide): requests, latency, queue depth, batch sizes,
generated tokens, and which backend/device/precision really runs each model."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("omedge_requests", "Requests answered, by model, endpoint and status code",
                                ["model", "endpoint", "code"], registry=r)
        self.latency = Histogram("omedge_request_seconds", "Request latency, admission to response",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("omedge_queue_depth", "Requests admitted and waiting to run", ["model"], registry=r)
        self.running = Gauge("omedge_running", "Batches or generations running now", ["model"], registry=r)
        self.batch_rows = Histogram("omedge_batch_rows", "Rows per batch sent to the graph", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tokens = Counter("omedge_generated_tokens", "Text pieces streamed or returned by LLM models",
                              ["model"], registry=r)
        self.cancelled = Counter("omedge_generations_cancelled", "Generations stopped because the client left",
                                 ["model"], registry=r)
        self.info = Gauge("omedge_model_info", "1 per served model, labelled with what really runs it",
                          ["model", "kind", "backend", "device", "precision", "manifest_sha256"], registry=r)

    def add_model(self, name: str, kind: str, info: dict, sha256: str, admission) -> None:
        self.info.labels(name, kind, str(info.get("backend", "")), str(info.get("device", "")),
                         str(info.get("precision", "")), sha256).set(1)
        self.queue_depth.labels(name).set_function(lambda: admission.waiting)
        self.running.labels(name).set_function(lambda: admission.running)

    def observe(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(model, endpoint, str(code)).inc()
        self.latency.labels(model, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
