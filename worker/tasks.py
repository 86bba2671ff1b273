"""Celery tasks ``diagnose`` (queue ``inference``) and ``deliver`` (queue ``delivery``).

``diagnose`` reads the image bytes from Redis, runs the inference pipeline (models loaded once per
worker process, in the process that runs the tasks, never in a prefork parent) and hands a JSON
result plus the Redis key of the overlay JPEG to ``deliver``. ``deliver`` sends the text reply and
the overlay photo exactly once: each part is marked in Redis *after* Telegram accepted it and the
mark is checked before sending, so retried or redelivered tasks never send twice. A request that
keeps failing gets an apology, never silence. Image bytes never go through the broker, to disk
or to the logs.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from functools import lru_cache
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown
from celery.utils.log import get_task_logger
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from diagnosis.i18n import pick_language, translations
from diagnosis.monitoring import DELIVERIES, ERRORS, REQUESTS, observe_result, serve_metrics
from diagnosis.settings import DELIVER_TASK, DELIVERY_QUEUE, DIAGNOSE_TASK, INFERENCE_QUEUE, Keys, Settings

from .celery_app import app
from .celery_app import settings as service_settings
from .telegram_out import Deferred, TelegramOut, Undeliverable, backoff

logger = get_task_logger(__name__)
process_logger = logging.getLogger(__name__)  # outside tasks (model loading)

TELEGRAM_TEXT_LIMIT = 4096
TELEGRAM_CAPTION_LIMIT = 1024
LOCK_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# --------------------------------------------------------------------------- per-process resources
@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


_resources_lock = threading.Lock()
_redis: tuple[int, redis.Redis] | None = None
_out: tuple[int, TelegramOut] | None = None


def get_redis() -> redis.Redis:
    global _redis
    with _resources_lock:
        if _redis is None or _redis[0] != os.getpid():
            # Retries with reconnect: ``from_url`` alone retries nothing, so after a Redis restart the
            # first command of each pooled connection would fail (and with it a request).
            retry = Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3)
            _redis = (os.getpid(), redis.Redis.from_url(get_settings().REDIS_URL, retry=retry))
        return _redis[1]


def get_out() -> TelegramOut:
    global _out
    with _resources_lock:
        if _out is None or _out[0] != os.getpid():
            _out = (os.getpid(), TelegramOut(get_settings()))
        return _out[1]


_pipeline: Any = None
_pipeline_lock = threading.Lock()


def get_pipeline() -> Any:
    """The inference pipeline, loaded once per process on first use (thread-safe)."""
    global _pipeline
    if _pipeline is not None:
        return _pipeline
    with _pipeline_lock:
        if _pipeline is None:
            settings = get_settings()
            _configure_torch_threads()
            from diagnosis.pipeline import Pipeline

            started = time.perf_counter()
            _pipeline = Pipeline.load(settings.MODELS_DIR, device=settings.DEVICE, backend=settings.BACKEND,
                                      heatmap=settings.HEATMAP, abnormality_models=settings.ABNORMALITY_MODELS)
            process_logger.info("models loaded from %s on %s in %.1fs: %s", settings.MODELS_DIR, settings.DEVICE,
                                time.perf_counter() - started, getattr(_pipeline, "versions", {}))
    return _pipeline


_batcher: Any = None


def analyse(data: bytes) -> Any:
    """One image through the pipeline; with BATCH_MAX > 1 through the shared micro-batcher."""
    global _batcher
    settings = get_settings()
    if settings.BATCH_MAX <= 1:
        return get_pipeline().run(data)
    with _pipeline_lock:
        if _batcher is None:
            from diagnosis.batching import MicroBatcher

            _batcher = MicroBatcher(get_pipeline().run_batch, settings.BATCH_MAX, settings.BATCH_WAIT_MS)
    return _batcher.submit(data)


_thread_state = threading.local()


def _configure_torch_threads() -> None:
    """torch.set_num_threads in the thread that runs the models (OpenMP settings are per thread)."""
    threads = get_settings().TORCH_THREADS
    if threads and not getattr(_thread_state, "configured", False):
        import torch

        torch.set_num_threads(threads)
        _thread_state.configured = True


def _preload() -> None:
    try:
        get_pipeline()
    except Exception:
        process_logger.exception("loading the models failed; tasks will retry and then apologise")


@worker_process_init.connect
def _start_preload(**_: Any) -> None:
    """In the process that runs tasks (prefork child or solo): load the models in the background.

    Returns at once (Celery kills a child whose init blocks > 4 s); the first task waits for the
    load through ``get_pipeline``'s lock. Workers that do not consume ``inference`` load nothing.
    """
    if INFERENCE_QUEUE in app.amqp.queues.consume_from:
        threading.Thread(target=_preload, name="load-models", daemon=True).start()
    try:  # metrics live in the process that runs the tasks (one child per worker: one port)
        serve_metrics(get_settings().METRICS_PORT, get_settings().REDIS_URL)
    except OSError:
        process_logger.warning("metrics port %s busy; this process serves no metrics", get_settings().METRICS_PORT)


@worker_process_shutdown.connect
def _close_telegram(**_: Any) -> None:
    if _out is not None and _out[0] == os.getpid():
        _out[1].close()


# --------------------------------------------------------------------------- diagnose
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
def diagnose(
    self: Task,
    request_id: str,
    blob_key: str,
    chat_id: int,
    reply_to_message_id: int,
    language: str,
    ack_message_id: int | None = None,
) -> dict[str, Any]:
    """Image bytes (Redis) → pipeline → ``deliver`` (JSON result + overlay key)."""
    settings = get_settings()
    keys, r = settings.keys, get_redis()
    try:
        if r.exists(keys.done(request_id)):
            return {"skipped": "already answered"}
        attempt = int(r.incr(keys.attempts(request_id)))
        r.expire(keys.attempts(request_id), settings.BLOB_TTL_S)
    except REDIS_UNAVAILABLE as error:
        raise retry_while_redis_is_down(self, settings, request_id, error) from None
    reply = {
        "request_id": request_id,
        "chat_id": chat_id,
        "reply_to_message_id": reply_to_message_id,
        "language": language,
        "ack_message_id": ack_message_id,
        "blob_key": blob_key,
    }
    if attempt > settings.MAX_ATTEMPTS:  # e.g. a worker keeps dying on this image
        logger.error("request %s: %d attempts, giving up with an apology", request_id, attempt - 1)
        hand_over(reply, failure="apology")
        REQUESTS.labels("failed").inc()
        return {"outcome": "failed"}

    try:
        data = r.get(blob_key)
    except REDIS_UNAVAILABLE as error:
        raise retry_while_redis_is_down(self, settings, request_id, error) from None
    if data is None:
        hand_over(reply, failure="expired")
        REQUESTS.labels("expired").inc()
        return {"outcome": "expired"}
    try:
        _configure_torch_threads()
        analysis = analyse(data)
    except SoftTimeLimitExceeded:
        logger.error("request %s: soft time limit exceeded", request_id)
        hand_over(reply, failure="apology")
        REQUESTS.labels("failed").inc()
        return {"outcome": "failed"}
    except Exception as error:
        del data
        logger.exception("request %s: analysis failed (attempt %d)", request_id, attempt)
        ERRORS.labels("inference").inc()
        if attempt < settings.MAX_ATTEMPTS:
            raise self.retry(countdown=min(backoff(attempt, base=2.0), settings.MAX_RETRY_DELAY_S), exc=error) from None
        hand_over(reply, failure="apology")
        REQUESTS.labels("failed").inc()
        return {"outcome": "failed"}
    del data

    result = analysis.result
    observe_result(result)
    overlay_key = None
    if analysis.overlay_jpeg:
        overlay_key = keys.overlay(request_id)
        r.set(overlay_key, analysis.overlay_jpeg, ex=settings.BLOB_TTL_S)
    hand_over(reply, result=result.model_dump(mode="json"), overlay_key=overlay_key)
    logger.info("request %s: %s", request_id, result.outcome)
    return {"outcome": result.outcome}


REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
REDIS_DOWN_RETRIES = 5


def retry_while_redis_is_down(task: Task, settings: Settings, request_id: str, error: Exception) -> Exception:
    """A failed task is acknowledged and gone: while Redis is unreachable, retry it a few times instead."""
    if task.request.retries >= REDIS_DOWN_RETRIES:
        return error
    countdown = min(backoff(task.request.retries + 1), settings.MAX_RETRY_DELAY_S)
    logger.warning("request %s: Redis unavailable (%s), retry in %.1fs", request_id, type(error).__name__, countdown)
    return task.retry(countdown=countdown, throw=False)


def hand_over(reply: dict[str, Any], **extra: Any) -> None:
    """Enqueue ``deliver`` with JSON arguments only (the overlay travels as a Redis key)."""
    app.send_task(DELIVER_TASK, kwargs={**reply, **extra}, queue=DELIVERY_QUEUE)


# --------------------------------------------------------------------------- deliver
@app.task(
    name=DELIVER_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=service_settings.DELIVER_SOFT_TIME_LIMIT_S,
    time_limit=service_settings.DELIVER_TIME_LIMIT_S,
    max_retries=service_settings.DELIVER_MAX_RETRIES,
)
def deliver(
    self: Task,
    request_id: str,
    chat_id: int,
    reply_to_message_id: int | None,
    language: str,
    ack_message_id: int | None = None,
    blob_key: str | None = None,
    result: dict[str, Any] | None = None,
    overlay_key: str | None = None,
    failure: str | None = None,
) -> dict[str, Any]:
    """Send the reply (text, then overlay photo) exactly once, then clean up."""
    settings = get_settings()
    try:
        sent = send_reply(
            get_redis(), get_out(), settings,
            request_id=request_id, chat_id=chat_id, reply_to_message_id=reply_to_message_id, language=language,
            ack_message_id=ack_message_id, blob_key=blob_key, result=result, overlay_key=overlay_key,
            failure=failure,
        )
    except Deferred as deferred:
        DELIVERIES.labels("deferred").inc()
        if self.request.retries >= (self.max_retries or 0):
            logger.error("request %s: giving up delivery after %d retries (%s)", request_id,
                         self.request.retries, deferred.reason)
            cleanup(get_redis(), settings.keys, request_id, blob_key, overlay_key)
            return {"sent": [], "gave_up": deferred.reason}
        countdown = min(max(deferred.delay, 0.5), settings.MAX_RETRY_DELAY_S)
        logger.info("request %s: delivery deferred (%s), retry in %.1fs", request_id, deferred.reason, countdown)
        raise self.retry(countdown=countdown) from None
    except REDIS_UNAVAILABLE as error:  # raised before anything was sent (see send_reply)
        raise retry_while_redis_is_down(self, settings, request_id, error) from None
    except Undeliverable as error:
        logger.warning("request %s: undeliverable: %s", request_id, error)
        DELIVERIES.labels("undeliverable").inc()
        cleanup(get_redis(), settings.keys, request_id, blob_key, overlay_key)
        return {"sent": [], "undeliverable": str(error)}
    DELIVERIES.labels("sent").inc(len(sent))
    return {"sent": sent}


def compose_texts(language: str, result: dict[str, Any] | None, failure: str | None) -> list[str]:
    """The reply as one or more Telegram messages (≤ 4096 characters each)."""
    from diagnosis.messages import apology, render_reply

    if failure == "expired":
        _ = translations(pick_language(language), "bot").gettext
        text = _("Your image is no longer available (it expired or was deleted with /forget). "
                 "Please send it again.")
    elif failure is not None or result is None:
        text = apology(language)
    else:
        from diagnosis.report import DiagnosisResult

        try:
            text = render_reply(DiagnosisResult.model_validate(result), language)
        except Exception:
            logger.exception("rendering the reply failed")
            text = apology(language)
    return split_text(text, TELEGRAM_TEXT_LIMIT)


def overlay_caption(language: str) -> str:
    _ = translations(pick_language(language), "bot").gettext
    return _("Heat map: the regions that most influenced the findings above. It is not a diagnosis.")


def split_text(text: str, limit: int) -> list[str]:
    """Split at paragraph or line breaks so that every piece fits one message."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind("\n\n", 0, limit)
        if cut <= 0:
            cut = rest.rfind("\n", 0, limit)
        if cut <= 0:
            cut = rest.rfind(" ", 0, limit)
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def send_reply(
    r: redis.Redis,
    out: TelegramOut,
    settings: Settings,
    *,
    request_id: str,
    chat_id: int,
    reply_to_message_id: int | None,
    language: str,
    ack_message_id: int | None = None,
    blob_key: str | None = None,
    result: dict[str, Any] | None = None,
    overlay_key: str | None = None,
    failure: str | None = None,
) -> list[str]:
    """Idempotent delivery; returns the parts sent by this call. Raises ``Deferred``/``Undeliverable``."""
    keys = settings.keys
    if r.exists(keys.done(request_id)):  # answered already (redelivered or duplicated task)
        cleanup(r, keys, request_id, blob_key, overlay_key)
        return []
    token = secrets.token_hex(8)
    if not r.set(keys.lock(request_id), token, nx=True, ex=settings.DELIVER_TIME_LIMIT_S):
        raise Deferred(2.0, "another delivery of this request is in progress")
    sent: list[str] = []
    try:
        if r.exists(keys.done(request_id)):  # finished while we waited for the lock (or claimed lost by the bot)
            cleanup(r, keys, request_id, blob_key, overlay_key)
            return []
        parts: list[tuple[str, str]] = [
            (f"text{index}", text) for index, text in enumerate(compose_texts(language, result, failure))
        ]
        overlay = r.get(overlay_key) if overlay_key and failure is None else None
        if overlay is not None:  # None: expired or forgotten; the text is enough
            parts.append(("photo", overlay_key))
        marks = [keys.sent(request_id, part) for part, _ in parts]
        already = [bool(flag) for flag in r.mget(marks)]
        # From here on Telegram is the record: once a part is accepted, a Redis failure (a restart)
        # must not stop the rest of the answer, nor leave the acknowledgement standing (the bot
        # would then tell the user the request was lost). Marks are written best effort.
        for (part, payload), mark, done_before in zip(parts, marks, already, strict=True):
            if done_before:
                continue
            if part == "photo":
                out.send_photo(chat_id, overlay, caption=overlay_caption(language)[:TELEGRAM_CAPTION_LIMIT],
                               reply_to=reply_to_message_id)
            else:
                out.send_text(chat_id, payload, reply_to=reply_to_message_id)
            sent.append(part)
            _best_effort(r.set, mark, "1", ex=settings.MARK_TTL_S)  # only after Telegram accepted it
        del overlay
        _best_effort(r.set, keys.done(request_id), "1", ex=settings.MARK_TTL_S)
        if ack_message_id is not None:
            out.delete_message(chat_id, ack_message_id)  # the answer replaces the acknowledgement
        _best_effort(cleanup, r, keys, request_id, blob_key, overlay_key)
    finally:
        _best_effort(r.eval, LOCK_RELEASE_LUA, 1, keys.lock(request_id), token)
    return sent


def _best_effort(call: Any, *args: Any, **kwargs: Any) -> None:
    """A Redis write that must not undo what Telegram already accepted (marks, clean-up)."""
    try:
        call(*args, **kwargs)
    except redis.RedisError as error:
        logger.warning("redis write skipped after delivery: %s", type(error).__name__)


def cleanup(r: redis.Redis, keys: Keys, request_id: str, blob_key: str | None, overlay_key: str | None) -> None:
    """The user has the answer (or cannot get one): delete the image and the overlay now."""
    names = [keys.blob(request_id), keys.overlay(request_id), keys.attempts(request_id)]
    names += [name for name in (blob_key, overlay_key) if name]
    r.delete(*names)
