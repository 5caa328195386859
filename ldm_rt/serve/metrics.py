"""Prometheus metrics of one service (its own registry, so that several apps in one process,
as in the tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ldm_rt_requests", "Image requests answered, by HTTP status.", ["code"], registry=r)
        self.images = Counter("ldm_rt_images", "Images generated.", registry=r)
        self.dropped = Counter("ldm_rt_dropped_requests",
                               "Requests dropped before they ran because the client disconnected.", registry=r)
        self.queue_depth = Gauge("ldm_rt_queue_depth", "Requests waiting for the model.", registry=r)
        self.running = Gauge("ldm_rt_batch_running", "1 while the model runs a batch.", registry=r)
        self.ready = Gauge("ldm_rt_ready", "1 once the model is loaded and warmed up.", registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, max_batch})
        self.batch_images = Histogram("ldm_rt_batch_size", "Images per batched generate call.", buckets=buckets,
                                      registry=r)
        self.batch_requests = Histogram("ldm_rt_batch_requests", "Requests per batched generate call.",
                                        buckets=buckets, registry=r)
        self.stage = Histogram("ldm_rt_stage_seconds", "Seconds per pipeline stage of a batch.", ["stage"],
                               buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("ldm_rt_queue_wait_seconds", "Seconds a request waited before its batch ran.",
                                    buckets=SECONDS, registry=r)
        self.latency = Histogram("ldm_rt_request_seconds", "Seconds from arrival to answer of an image request.",
                                 buckets=SECONDS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
