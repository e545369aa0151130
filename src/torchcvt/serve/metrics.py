"""Prometheus metrics of the server, in the text format at ``GET /metrics``.

``cvt_requests_total{endpoint,status}``, ``cvt_request_duration_seconds{endpoint}`` (histogram),
``cvt_batch_size`` and ``cvt_batch_duration_seconds`` (histograms of the model's forward passes),
``cvt_queue_depth`` (images waiting), ``cvt_images_total`` and ``cvt_images_per_second`` (over the
last ``RATE_WINDOW`` seconds).

With several worker processes each keeps its own values; prometheus_client's multiprocess mode
(the ``PROMETHEUS_MULTIPROC_DIR`` environment variable, set by ``cvt serve`` before the workers
start) sums them, whichever worker answers the scrape. Gauges count live workers only.
"""

from __future__ import annotations

import os
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess,
)

RATE_WINDOW = 10.0  # seconds of history behind cvt_images_per_second

REQUESTS = Counter("cvt_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"])
LATENCY = Histogram(
    "cvt_request_duration_seconds", "Time from request to response, by endpoint", ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SIZE = Histogram("cvt_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_SECONDS = Histogram(
    "cvt_batch_duration_seconds", "Time of one forward pass",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
QUEUE_DEPTH = Gauge("cvt_queue_depth", "Images waiting for the model", multiprocess_mode="livesum")
IMAGES = Counter("cvt_images", "Images classified")
SHED = Counter("cvt_shed_images", "Images refused (503) when their batch was assembled: their deadline would have passed")
IMAGES_PER_SECOND = Gauge(
    "cvt_images_per_second", f"Images classified per second over the last {RATE_WINDOW:g} s", multiprocess_mode="livesum"
)


class Throughput:
    """Images per second over a sliding window, for the ``cvt_images_per_second`` gauge."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.events: deque[tuple[float, int]] = deque()

    def add(self, images: int) -> None:
        self.events.append((time.monotonic(), images))

    def update_gauge(self) -> None:
        cutoff = time.monotonic() - self.window
        while self.events and self.events[0][0] < cutoff:
            self.events.popleft()
        IMAGES_PER_SECOND.set(sum(n for _, n in self.events) / self.window)


def record_batch(size: int, seconds: float, throughput: Throughput) -> None:
    BATCH_SIZE.observe(size)
    BATCH_SECONDS.observe(seconds)
    IMAGES.inc(size)
    throughput.add(size)


def record_request(endpoint: str, status: int, seconds: float) -> None:
    REQUESTS.labels(endpoint, str(status)).inc()
    LATENCY.labels(endpoint).observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type: every worker's values in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def worker_exited() -> None:
    """Drop this process's live gauges (queue depth, images/s) from the multiprocess totals."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())
