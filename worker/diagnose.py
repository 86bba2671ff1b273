"""Celery task ``diagnose`` (queue ``inference``): image bytes (Redis) → pipeline → ``deliver``.

Reads the image from Redis, runs the inference pipeline of this process (``worker.resources``) and
hands the JSON result, the request envelope and the Redis key of the overlays to ``deliver``: one
hash ``overlay:<id>`` (finding label → JPEG, one per drawn finding, in ``result.heatmap_labels``
order), so the short TTL, /forget and the clean-up cover every overlay with one key.
A request that keeps failing (errors, a worker dying on it, time limits) ends with an apology, never
silence. Image bytes never go through the broker, to disk or to the logs.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from contract.envelope import RequestEnvelope
from contract.keys import DELIVER_TASK, DELIVERY_QUEUE, DIAGNOSE_TASK, INFERENCE_QUEUE
from contract.monitoring import ERRORS, REQUESTS, observe_result
from contract.telegram import backoff

from . import resources
from .celery_app import app
from .celery_app import settings as service_settings
from .resources import REDIS_UNAVAILABLE, get_redis, get_settings, retry_later, retry_while_redis_is_down

logger = get_task_logger(__name__)


@app.task(
    name=DIAGNOSE_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=service_settings.DIAGNOSE_SOFT_TIME_LIMIT_S,
    time_limit=service_settings.DIAGNOSE_TIME_LIMIT_S,
    # A run killed at the hard time limit (a hang the soft limit could not interrupt) is requeued,
    # not acknowledged: Celery's default would drop the request silently. MAX_ATTEMPTS bounds the
    # redeliveries and ends them with an apology.
    acks_on_timeout=False,
    max_retries=None,  # bounded by MAX_ATTEMPTS, which also counts redeliveries
)
def diagnose(self: Task, envelope: dict[str, Any]) -> dict[str, Any]:
    """Image bytes (Redis) → pipeline → ``deliver`` (envelope + JSON result + overlay key)."""
    request = RequestEnvelope.model_validate(envelope)
    settings = get_settings()
    keys, r = settings.keys, get_redis()
    try:
        if r.exists(keys.done(request.request_id)):
            return {"skipped": "already answered"}
        attempt = int(r.incr(keys.attempts(request.request_id)))
        r.expire(keys.attempts(request.request_id), settings.BLOB_TTL_S)
    except REDIS_UNAVAILABLE as error:
        raise retry_while_redis_is_down(self, settings, request.request_id, error) from None
    if attempt > settings.MAX_ATTEMPTS:  # e.g. a worker keeps dying on this image
        logger.error("request %s: %d attempts, giving up with an apology", request.request_id, attempt - 1)
        return give_up(request, "apology")

    try:
        data = r.get(request.blob_key)
    except REDIS_UNAVAILABLE as error:
        raise retry_while_redis_is_down(self, settings, request.request_id, error) from None
    if data is None:
        hand_over(request, failure="expired")
        REQUESTS.labels("expired").inc()
        return {"outcome": "expired"}
    try:
        resources.configure_torch_threads()
        analysis = resources.analyse(data, request.mode)  # looked up at call time: a test plugin may wrap it
    except (SoftTimeLimitExceeded, resources.AnalysisTimedOut):
        logger.error("request %s: soft time limit exceeded", request.request_id)
        return give_up(request, "apology")
    except Exception as error:
        del data
        logger.exception("request %s: analysis failed (attempt %d)", request.request_id, attempt)
        ERRORS.labels("inference").inc()
        if attempt < settings.MAX_ATTEMPTS:
            countdown = min(backoff(attempt, base=2.0), settings.MAX_RETRY_DELAY_S)
            return retry_later(self, INFERENCE_QUEUE, countdown, exc=error)
        return give_up(request, "apology")
    del data

    result = analysis.result
    observe_result(result)
    overlay_key = None
    if analysis.overlays:
        overlay_key = keys.overlay(request.request_id)
        with r.pipeline(transaction=True) as pipe:  # never a hash without its TTL
            pipe.delete(overlay_key)  # a retried task replaces, never adds
            pipe.hset(overlay_key, mapping=dict(analysis.overlays))
            pipe.expire(overlay_key, settings.BLOB_TTL_S)
            pipe.execute()
    hand_over(request, result=result.model_dump(mode="json"), overlay_key=overlay_key)
    logger.info("request %s: %s", request.request_id, result.outcome)
    return {"outcome": result.outcome}


def give_up(request: RequestEnvelope, failure: str) -> dict[str, Any]:
    hand_over(request, failure=failure)
    REQUESTS.labels("failed").inc()
    return {"outcome": "failed"}


def hand_over(request: RequestEnvelope, **extra: Any) -> None:
    """Enqueue ``deliver`` with JSON arguments only (the overlay travels as a Redis key)."""
    app.send_task(DELIVER_TASK, kwargs={"envelope": request.to_json(), **extra}, queue=DELIVERY_QUEUE)
