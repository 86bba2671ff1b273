"""Per-process resources of a worker: settings, Redis, the Telegram sender and the inference pipeline.

Everything is created lazily in the process that runs the tasks (never in a prefork parent), once
per process: the models are loaded in the background as soon as a process that consumes the
``inference`` queue starts, and the first task waits for them. Delivery-only workers load nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from celery.signals import worker_process_init, worker_process_shutdown

from contract.keys import INFERENCE_QUEUE
from contract.monitoring import serve_metrics
from contract.redis_client import connect
from contract.settings import Settings
from contract.telegram import backoff

from .celery_app import app
from .celery_app import settings as process_settings
from .telegram_out import TelegramOut

process_logger = logging.getLogger(__name__)  # outside tasks (model loading)

REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)

_resources_lock = threading.Lock()
_redis: tuple[int, redis.Redis] | None = None
_out: tuple[int, TelegramOut] | None = None


def get_settings() -> Settings:
    """The process's settings (``worker.celery_app.settings``); the tasks need the bot token."""
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


REDIS_DOWN_RETRIES = 5


def retry_while_redis_is_down(task: Any, settings: Settings, request_id: str, error: Exception) -> Exception:
    """A failed task is acknowledged and gone: while Redis is unreachable, retry it a few times instead."""
    if task.request.retries >= REDIS_DOWN_RETRIES:
        return error
    countdown = min(backoff(task.request.retries + 1), settings.MAX_RETRY_DELAY_S)
    process_logger.warning("request %s: Redis unavailable (%s), retry in %.1fs", request_id, type(error).__name__,
                           countdown)
    return task.retry(countdown=countdown, throw=False)
