"""The ``deliver`` task's HTTP API channel: the answer is written once to Redis, then the callback queued.

Instead of a Telegram reply, ``deliver`` stores the analysis record's answer (``contract.analyses``):
the result with the same keys as ``xray-diagnose --json`` (``message`` rendered in the request's
language, ``overlay``/``overlays`` as the URLs of ``GET /v1/analyses/{id}/overlays/{n}``), the
overlays' labels and captions, or the error of a failed request. The overlays stay where
``diagnose`` put them (``overlay:<id>``) until the record expires; the image is deleted now.
Written once (``STORE_ANSWER_LUA``): a redelivered task finds the answer and only re-queues the
callback, which is idempotent by id (``worker.callback``).
"""

from __future__ import annotations

from typing import Any

import redis
from celery.utils.log import get_task_logger

from contract import texts
from contract.analyses import STORE_ANSWER_LUA, answer_keys, dumps, now_iso, overlay_path
from contract.envelope import RequestEnvelope
from contract.keys import CALLBACK_TASK, DELIVERY_QUEUE
from contract.settings import ServiceSettings

logger = get_task_logger(__name__)


def overlay_labels(r: redis.Redis, overlay_key: str | None, result: dict[str, Any] | None) -> list[str]:
    """The labels of the stored overlays, in drawn order (``result["heatmap_labels"]``)."""
    if not overlay_key:
        return []
    stored = {k.decode() if isinstance(k, bytes) else k for k in r.hkeys(overlay_key)}
    drawn = list((result or {}).get("heatmap_labels") or [])
    return [label for label in drawn if label in stored] + sorted(stored - set(drawn))


def compose_answer(request: RequestEnvelope, result: dict[str, Any] | None, failure: str | None,
                   labels: list[str]) -> dict[str, Any]:
    """The answer part of the analysis record, rendered in the request's language."""
    from diagnosis.messages import apology, overlay_caption, render_reply
    from diagnosis.report import DiagnosisResult

    language, request_id = request.language, request.request_id
    if failure is not None or result is None:
        code = failure or "apology"
        detail = texts.expired(language) if code == "expired" else apology(language)
        return {"status": "failed", "completed_at": now_iso(), "result": None, "overlays": [],
                "error": {"code": code, "detail": detail}}
    parsed = DiagnosisResult.model_validate(result)
    urls = [overlay_path(request_id, number) for number in range(1, len(labels) + 1)]
    probabilities = {f.label: f.probability for f in parsed.findings}
    flagged = {f.label for f in parsed.positive_findings}
    parsed = parsed.model_copy(update={"file": None, "overlays": urls, "overlay": urls[0] if urls else None})
    parsed.message = render_reply(parsed, language)
    overlays = [{"n": number, "label": label, "url": url,
                 "caption": overlay_caption(label, probabilities.get(label), language,
                                            flagged=label in flagged or not parsed.findings)}
                for number, (label, url) in enumerate(zip(labels, urls, strict=True), start=1)]
    return {"status": "succeeded", "completed_at": now_iso(), "result": parsed.model_dump(mode="json"),
            "overlays": overlays, "error": None}


def store_answer(r: redis.Redis, app: Any, settings: ServiceSettings, request: RequestEnvelope,
                 result: dict[str, Any] | None, overlay_key: str | None, failure: str | None) -> dict[str, Any]:
    """Write the answer (first time only) and queue the callback; returns what happened."""
    keys, request_id = settings.keys, request.request_id
    labels = overlay_labels(r, overlay_key, result) if failure is None else []
    answer = compose_answer(request, result, failure, labels)
    written = int(r.eval(STORE_ANSWER_LUA, 7, *answer_keys(keys, request_id), dumps(answer), settings.BLOB_TTL_S,
                         settings.MARK_TTL_S, request_id))
    if written < 0:
        logger.info("request %s: deleted by its client before the answer; nothing stored", request_id)
        return {"stored": False, "deleted": True}
    if request.callback_url:  # also when already written: a redelivered deliver re-queues a lost callback
        app.send_task(CALLBACK_TASK, kwargs={"envelope": request.to_json()}, queue=DELIVERY_QUEUE)
    logger.info("request %s: answer %s (%s)", request_id, "stored" if written else "already stored", answer["status"])
    return {"stored": bool(written), "status": answer["status"]}
