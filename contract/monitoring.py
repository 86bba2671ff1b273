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
- ``xray_telegram_429_total{component}``: Bot API answers 429 (flood control) — bot, delivery workers;
- ``xray_errors_total{component}``: unexpected exceptions;
- ``xray_queue_depth{queue}``: messages waiting in the Celery queues, read from Redis at scrape time;
- ``xray_queue_oldest_age_seconds{queue}``: how long the oldest waiting message has waited (0: the queue
  is empty), from the time every publisher stamps on its messages (``stamp_enqueue_time``).

Alert rules and a Grafana dashboard over these: deploy/prometheus/alerts.yml, deploy/grafana/.
"""

from __future__ import annotations

import json
import logging
import time

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
TELEGRAM_429 = Counter("xray_telegram_429_total", "Bot API answers 429 (flood control), by component", ["component"])

# A message header: when the message was published (unix seconds). Set by every process that
# publishes tasks (bot, API, workers: ``stamp_enqueue_time``); read by ``QueueDepthCollector``.
ENQUEUED_AT_HEADER = "xso_enqueued_at"


def _stamp(headers: dict | None = None, **_: object) -> None:
    if headers is not None:
        headers[ENQUEUED_AT_HEADER] = time.time()  # a retry or a scheduled task: when it was queued again


def stamp_enqueue_time() -> None:
    """Every task this process publishes carries its publication time (celery's before_task_publish)."""
    from celery.signals import before_task_publish

    before_task_publish.connect(_stamp, weak=False, dispatch_uid="xso-enqueued-at")


def message_age(raw: bytes | None, now: float) -> float | None:
    """Seconds since a kombu Redis message was published; None when it carries no stamp."""
    if raw is None:
        return None
    try:
        stamp = json.loads(raw)["headers"][ENQUEUED_AT_HEADER]
        return max(0.0, now - float(stamp))
    except (ValueError, KeyError, TypeError):
        return None


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
        age = GaugeMetricFamily("xray_queue_oldest_age_seconds",
                                "Seconds the oldest waiting message of each Celery queue has waited (0: empty)",
                                labels=["queue"])
        now = time.time()
        for queue in self.queues:
            try:
                depth = self.client.llen(queue)
                # kombu LPUSHes and BRPOPs: the oldest message is the list's last element.
                oldest = self.client.lindex(queue, -1) if depth else None
            except Exception:  # Redis down: report nothing rather than break the scrape
                log.warning("queue depth unavailable for %s", queue)
                continue
            gauge.add_metric([queue], float(depth))
            waited = message_age(oldest, now)
            if not depth or waited is not None:
                age.add_metric([queue], waited or 0.0)
        yield gauge
        yield age


_serving: set[int] = set()


def queue_collector(settings) -> QueueDepthCollector:
    """The queue-depth collector of a service process (``contract.settings.ServiceSettings``): the
    queues are on the Celery broker (CELERY_BROKER_URL, else REDIS_URL)."""
    return QueueDepthCollector(settings.broker_url)


def serve_service_metrics(settings) -> bool:
    """/metrics of the bot and the workers: on METRICS_PORT, with ``queue_collector``."""
    return serve_metrics(settings.METRICS_PORT, lambda: queue_collector(settings))


def serve_metrics(port: int | None, queues=None) -> bool:
    """Start the /metrics HTTP server once per process; returns whether it is (now) serving.
    ``queues``: a broker URL whose Celery queues ``xray_queue_depth`` reports, or a callable making
    that collector (``queue_collector``)."""
    if not port:
        return False
    if port in _serving:
        return True
    if queues:
        REGISTRY.register(queues() if callable(queues) else QueueDepthCollector(queues))
    start_http_server(port)
    _serving.add(port)
    log.info("Prometheus metrics on :%d/metrics", port)
    return True
