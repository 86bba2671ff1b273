"""Celery task ``callback`` (queue ``delivery``): POST a finished HTTP API analysis to its callback_url.

At least once, idempotent by id: the body is the analysis document (``GET /v1/analyses/{id}``), the
header ``X-XSO-Signature: t=<unix>,v1=<hex>`` its HMAC-SHA256 under the key's callback secret
(``contract.analyses.callback_secret``), ``X-XSO-Delivery`` the analysis id. A 2xx marks it delivered
(``api-callback:<id>``; a redelivered task then does nothing); anything else is retried with
exponential backoff up to API_CALLBACK_MAX_RETRIES. Redirects are not followed. The log names the
host only (a URL's query may carry the client's own token).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import Task
from celery.utils.log import get_task_logger

from contract.analyses import (
    SIGNATURE_HEADER,
    callback_secret,
    callback_target_refused,
    decode_hash,
    dumps,
    resource,
    signature_header,
)
from contract.envelope import RequestEnvelope
from contract.keys import CALLBACK_TASK, DELIVERY_QUEUE
from contract.monitoring import CALLBACKS
from contract.telegram import backoff

from .celery_app import app
from .celery_app import settings as service_settings
from .resources import REDIS_UNAVAILABLE, get_redis, get_settings, retry_later, retry_while_redis_is_down

logger = get_task_logger(__name__)


@app.task(
    name=CALLBACK_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=service_settings.DELIVER_SOFT_TIME_LIMIT_S,
    time_limit=service_settings.DELIVER_TIME_LIMIT_S,
    max_retries=service_settings.API_CALLBACK_MAX_RETRIES,
)
def callback(self: Task, envelope: dict[str, Any]) -> dict[str, Any]:
    request = RequestEnvelope.model_validate(envelope)
    settings = get_settings()
    keys, request_id = settings.keys, request.request_id
    if not request.callback_url or settings.API_CALLBACK_SECRET is None:
        return {"skipped": "no callback_url or no API_CALLBACK_SECRET"}
    try:
        r = get_redis()
        if r.exists(keys.api_callback(request_id)):
            return {"skipped": "already delivered"}
        meta = decode_hash(r.hgetall(keys.api_request(request_id)))
        raw = r.get(keys.api_result(request_id))
    except REDIS_UNAVAILABLE as error:
        raise retry_while_redis_is_down(self, settings, request_id, error) from None
    if not meta or raw is None:
        return {"skipped": "deleted or expired"}
    document = resource(request_id, meta, json.loads(raw), processing=False)
    body = dumps(document).encode()
    secret = callback_secret(settings.API_CALLBACK_SECRET.get_secret_value(), request.client or "")
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature_header(secret, body),
               "X-XSO-Delivery": request_id, "User-Agent": "xray-second-opinion-callback/1"}
    host = urlsplit(request.callback_url).hostname
    # Again here: the name may resolve to another address than when the request was accepted.
    refused = callback_target_refused(request.callback_url, settings.API_CALLBACK_ALLOW_PRIVATE)
    if refused:
        CALLBACKS.labels("refused").inc()
        logger.warning("request %s: callback to %s refused: not a public address", request_id, host)
        return {"sent": False, "refused": "not a public address"}
    try:
        response = httpx.post(request.callback_url, content=body, headers=headers,
                              timeout=settings.API_CALLBACK_TIMEOUT_S, follow_redirects=False)
        status: int | str = response.status_code
    except httpx.HTTPError as error:
        status = type(error).__name__
    if isinstance(status, int) and 200 <= status < 300:
        r.set(keys.api_callback(request_id), "1", ex=settings.MARK_TTL_S)
        CALLBACKS.labels("sent").inc()
        logger.info("request %s: callback to %s accepted (%s)", request_id, host, status)
        return {"sent": True, "status": status}
    if self.request.retries >= (self.max_retries or 0):
        CALLBACKS.labels("gave_up").inc()
        logger.warning("request %s: callback to %s gave up after %d retries (%s)", request_id, host,
                       self.request.retries, status)
        return {"sent": False, "gave_up": str(status)}
    CALLBACKS.labels("retried").inc()
    countdown = min(backoff(self.request.retries + 1, base=1.0), settings.MAX_RETRY_DELAY_S)
    logger.info("request %s: callback to %s failed (%s), retry in %.1fs", request_id, host, status, countdown)
    return retry_later(self, DELIVERY_QUEUE, countdown)
