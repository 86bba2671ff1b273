"""Prometheus metrics for the bot and the workers (prometheus-client; no torch here).

Each process serves its own /metrics on ``METRICS_PORT`` when set. Names:

- ``xray_stage_seconds{stage}``: pipeline stage latency (decode, preprocess, gate, body_part, chest,
  heatmap, overlay, total) — histogram, observed in inference workers;
- ``xray_requests_total{outcome}``: analysed, not_xray, body_part_uncertain, body_part_unknown, body_part_not_analysed,
  rejected (bad input), expired, failed (apology sent) — inference workers;
- ``xray_deliveries_total{result}``: sent, deferred (429/5xx, retried), undeliverable, stored (an HTTP API
  answer), duplicate — delivery workers;
- ``xray_callbacks_total{result}``: sent, retried, gave_up — HTTP API callbacks, delivery workers;
- ``xray_api_requests_total{route,status}`` and ``xray_api_request_seconds{route}``: the HTTP API;
- ``xray_bot_updates_total{kind}``: enqueued, rate_limited, too_large, download_failed,
  enqueue_failed, not_allowed, other — the bot;
- ``xray_errors_total{component}``: unexpected exceptions;
- ``xray_queue_depth{queue}``: messages waiting in the Celery queues, read from Redis at scrape time.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .keys import DELIVERY_QUEUE, INFERENCE_QUEUE

log = logging.getLogger(__name__)

STAGE_SECONDS = Histogram("xray_stage_seconds", "Pipeline stage latency in seconds", ["stage"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
REQUESTS = Counter("xray_requests_total", "Analysis requests by outcome", ["outcome"])
DELIVERIES = Counter("xray_deliveries_total", "Reply parts by delivery result", ["result"])
BOT_UPDATES = Counter("xray_bot_updates_total", "Images and messages the bot handled, by kind", ["kind"])
CALLBACKS = Counter("xray_callbacks_total", "HTTP API callbacks by result", ["result"])
API_REQUESTS = Counter("xray_api_requests_total", "HTTP API responses by route and status", ["route", "status"])
API_SECONDS = Histogram("xray_api_request_seconds", "HTTP API response time in seconds", ["route"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("xray_errors_total", "Unexpected exceptions by component", ["component"])


def observe_result(result) -> None:
    """Record one ``diagnosis.report.DiagnosisResult``: its outcome and every stage's time."""
    REQUESTS.labels(result.outcome).inc()
    for stage, milliseconds in result.timings_ms.items():
        STAGE_SECONDS.labels(stage).observe(milliseconds / 1000)


class QueueDepthCollector:
    """Reads queue lengths from Redis when Prometheus scrapes (no background polling)."""

    def __init__(self, redis_url: str, queues: tuple[str, ...] = (INFERENCE_QUEUE, DELIVERY_QUEUE)):
        from .redis_client import connect

        self.client = connect(redis_url, socket_timeout=2)
        self.queues = queues

    def collect(self):
        gauge = GaugeMetricFamily("xray_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for queue in self.queues:
            try:
                gauge.add_metric([queue], float(self.client.llen(queue)))
            except Exception:  # Redis down: report nothing rather than break the scrape
                log.warning("queue depth unavailable for %s", queue)
        yield gauge


_serving: set[int] = set()


def serve_metrics(port: int | None, redis_url: str | None = None) -> bool:
    """Start the /metrics HTTP server once per process; returns whether it is (now) serving."""
    if not port:
        return False
    if port in _serving:
        return True
    if redis_url:
        REGISTRY.register(QueueDepthCollector(redis_url))
    start_http_server(port)
    _serving.add(port)
    log.info("Prometheus metrics on :%d/metrics", port)
    return True
