"""Per-process resources of a worker: settings, Redis, the Telegram sender, the delayed-task
scheduler and the inference pipeline.

Everything is created in the process that runs the tasks (never in a prefork parent), once per
process. A process that consumes the ``inference`` queue loads the models before it takes its first
task (``worker_process_init``; the pool waits for it), so loading never counts against a task's
time limit. Delivery-only workers load nothing. Every task process runs the loop that publishes
delayed tasks when they are due (``worker.scheduler``); ``retry_later`` parks long countdowns there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from contract.keys import INFERENCE_QUEUE
from contract.monitoring import serve_service_metrics
from contract.pacing import Limits, Pacer
from contract.redis_client import connect
from contract.settings import CELERY_COUNTDOWN_MAX_S, ServiceSettings, Settings
from contract.telegram import backoff

from .celery_app import app
from .celery_app import settings as process_settings
from .scheduler import Scheduler
from .telegram_out import TelegramOut

process_logger = logging.getLogger(__name__)  # outside tasks (model loading)

REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)

_resources_lock = threading.Lock()
_redis: tuple[int, redis.Redis] | None = None
_out: tuple[int, TelegramOut] | None = None


def get_settings() -> ServiceSettings:
    """The process's settings (``worker.celery_app.settings``). No bot token needed: a worker whose
    deployment only serves the HTTP API runs without TELEGRAM_BOT_TOKEN; ``telegram_settings`` (the
    Telegram sender) asks for it."""
    return process_settings


def has_bot_token() -> bool:
    return isinstance(process_settings, Settings)


def telegram_settings() -> Settings:
    """The settings with the bot token, for answers sent to Telegram."""
    if not isinstance(process_settings, Settings):
        Settings()  # raises the validation error that explains what is wrong with TELEGRAM_BOT_TOKEN
    return process_settings


def get_redis() -> redis.Redis:
    global _redis
    with _resources_lock:
        if _redis is None or _redis[0] != os.getpid():
            _redis = (os.getpid(), connect(get_settings().REDIS_URL))
        return _redis[1]


def get_out() -> TelegramOut:
    """The Telegram sender of this process; its messages wait for the shared send slots (contract.pacing)."""
    global _out
    redis_client = get_redis()
    with _resources_lock:
        if _out is None or _out[0] != os.getpid():
            settings = telegram_settings()
            pacer = Pacer(redis_client, settings.keys, Limits.from_settings(settings))
            _out = (os.getpid(), TelegramOut(settings, pacer=pacer))
        return _out[1]


_scheduler: tuple[int, Scheduler] | None = None


def get_scheduler() -> Scheduler:
    """The delayed-task store of this process; its publishing loop runs once per process."""
    global _scheduler
    redis_client = get_redis()
    with _resources_lock:
        if _scheduler is None or _scheduler[0] != os.getpid():
            scheduler = Scheduler(redis_client, app, get_settings().keys.scheduled())
            scheduler.start_loop()
            _scheduler = (os.getpid(), scheduler)
        return _scheduler[1]


def retry_later(task: Any, queue: str, countdown: float, exc: Exception | None = None) -> dict[str, Any]:
    """Run ``task`` again with the same arguments in ``countdown`` seconds, as its next retry.

    Short countdowns stay with Celery (the worker holds the message, unacknowledged, for a moment);
    longer ones are parked in Redis and this run ends, so no message waits unacknowledged for long
    and the broker's visibility timeout can stay short (``ServiceSettings.visibility_timeout_s``).
    """
    if countdown <= CELERY_COUNTDOWN_MAX_S:
        raise task.retry(countdown=countdown, exc=exc)
    try:
        get_scheduler().later(task.name, dict(task.request.kwargs), queue, countdown, task.request.retries + 1)
    except REDIS_UNAVAILABLE:
        raise task.retry(countdown=CELERY_COUNTDOWN_MAX_S, exc=exc) from None
    process_logger.info("%s[%s]: retry %d parked for %.1fs", task.name, task.request.id, task.request.retries + 1,
                        countdown)
    return {"retry_in": countdown}


_pipeline: Any = None
_pipeline_lock = threading.Lock()


def get_pipeline() -> Any:
    """The inference pipeline, loaded once per process on first use (thread-safe)."""
    global _pipeline
    if _pipeline is not None:
        return _pipeline
    with _pipeline_lock:
        if _pipeline is None:
            configure_torch_threads()
            from diagnosis.config import PipelineConfig
            from diagnosis.pipeline import Pipeline

            config = PipelineConfig.from_settings(get_settings())
            started = time.perf_counter()
            _pipeline = Pipeline.load(config)
            process_logger.info("models loaded from %s on %s (%s) in %.1fs: %s", config.models_dir, config.device,
                                config.backend, time.perf_counter() - started, getattr(_pipeline, "versions", {}))
    return _pipeline


_batcher: Any = None


class AnalysisTimedOut(Exception):
    """The micro-batcher did not answer within the soft time limit (thread pools enforce none)."""


def get_batcher() -> Any:
    """The process's micro-batcher (BATCH_MAX > 1 or BATCH_LOOPS > 1), created once. Its items are
    (image, reply mode) pairs: each image keeps its own mode within a batch."""
    global _batcher
    if _batcher is None:
        pipeline = get_pipeline()
        with _pipeline_lock:
            if _batcher is None:
                from diagnosis.batching import MicroBatcher

                def run_batch(items: list[tuple[bytes, str]]) -> list[Any]:
                    return pipeline.run_batch([data for data, _ in items], modes=[mode for _, mode in items])

                settings = get_settings()
                _batcher = MicroBatcher(run_batch, settings.BATCH_MAX, settings.BATCH_WAIT_MS,
                                        loops=settings.BATCH_LOOPS, on_loop_start=configure_torch_threads)
    return _batcher


def analyse(data: bytes, mode: str = "screening") -> Any:
    """One image through the pipeline in the request's reply ``mode``; with BATCH_MAX > 1 or
    BATCH_LOOPS > 1 through the shared micro-batcher (a thread pool's task threads feed it). The wait
    is bounded by the soft time limit, which a thread pool does not enforce itself: past it the image
    is dropped and the task apologises."""
    settings = get_settings()
    if settings.BATCH_MAX <= 1 and settings.BATCH_LOOPS <= 1:
        return get_pipeline().run(data, mode=mode)
    from concurrent.futures import TimeoutError as FutureTimeout

    try:
        return get_batcher().submit((data, mode), timeout=settings.DIAGNOSE_SOFT_TIME_LIMIT_S)
    except FutureTimeout:
        raise AnalysisTimedOut from None


_thread_state = threading.local()


def configure_torch_threads() -> None:
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
def _prepare_process(**_: Any) -> None:
    """In the process that runs tasks (prefork child or solo), before it takes one: load the models
    (``worker_proc_alive_timeout`` gives a prefork child the time), start the scheduler loop, serve
    metrics. Workers that do not consume ``inference`` load no models."""
    if INFERENCE_QUEUE in app.amqp.queues.consume_from:
        _preload()
    _start_scheduler()
    try:  # metrics live in the process that runs the tasks (one child per worker: one port)
        serve_service_metrics(get_settings())
    except OSError:
        process_logger.warning("metrics port %s busy; this process serves no metrics", get_settings().METRICS_PORT)


@worker_ready.connect
def _say_without_bot_token(**_: Any) -> None:
    if not has_bot_token():
        process_logger.warning("no valid TELEGRAM_BOT_TOKEN: this worker serves HTTP API requests only; an answer "
                               "for Telegram is deferred until a worker with the token takes it")


@worker_ready.connect
def _scheduler_for_thread_pools(sender: Any = None, **_: Any) -> None:
    """Pools without ``worker_process_init`` (threads, gevent) run their tasks in the main process:
    it publishes the delayed tasks. A prefork parent does not (it forks children; no threads there)."""
    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__.endswith(("prefork", "solo")):
        return
    if INFERENCE_QUEUE in app.amqp.queues.consume_from:  # load before the first task, as prefork does
        _preload()
    _start_scheduler()


def _start_scheduler() -> None:
    try:
        get_scheduler()
    except Exception as error:  # e.g. no bot token (celery inspect); tasks start it on first use
        process_logger.debug("scheduler not started: %s", type(error).__name__)


@worker_process_shutdown.connect
def _close_telegram(**_: Any) -> None:
    if _out is not None and _out[0] == os.getpid():
        _out[1].close()


REDIS_DOWN_RETRIES = 5


def retry_while_redis_is_down(task: Any, settings: ServiceSettings, request_id: str, error: Exception) -> Exception:
    """A failed task is acknowledged and gone: while Redis is unreachable, retry it a few times instead."""
    if task.request.retries >= REDIS_DOWN_RETRIES:
        return error
    # A short countdown, held by Celery: the scheduler lives in Redis too.
    countdown = min(backoff(task.request.retries + 1), settings.MAX_RETRY_DELAY_S, CELERY_COUNTDOWN_MAX_S)
    process_logger.warning("request %s: Redis unavailable (%s), retry in %.1fs", request_id, type(error).__name__,
                           countdown)
    return task.retry(countdown=countdown, throw=False)
