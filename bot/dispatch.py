"""Enqueue the analysis by task *name*: the bot never imports the worker package or torch.

The task gets JSON arguments only (the request envelope, with the Redis key of the image), never bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from celery import Celery

from contract.envelope import RequestEnvelope
from contract.keys import DIAGNOSE_TASK, INFERENCE_QUEUE
from contract.monitoring import stamp_enqueue_time
from contract.settings import ServiceSettings


def diagnose_kwargs(request: RequestEnvelope) -> dict[str, Any]:
    """The ``diagnose`` task's keyword arguments (the worker's signature must accept exactly these)."""
    return {"envelope": request.to_json()}


def make_client(settings: ServiceSettings) -> Celery:
    """A producer-only Celery app with the same serialisation rules as the workers."""
    client = Celery("xray-bot", broker=settings.broker_url, set_as_current=False)
    stamp_enqueue_time()  # the queue's age for Prometheus (contract.monitoring)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
    )
    return client


class Dispatcher:
    def __init__(self, settings: ServiceSettings):
        self.client = make_client(settings)

    def enqueue_sync(self, request: RequestEnvelope) -> str:
        result = self.client.send_task(DIAGNOSE_TASK, kwargs=diagnose_kwargs(request), queue=INFERENCE_QUEUE,
                                       retry=True)
        return result.id

    async def enqueue(self, request: RequestEnvelope) -> str:
        """Publish without blocking the event loop (kombu's producer pool is thread-safe)."""
        return await asyncio.to_thread(self.enqueue_sync, request)

    def close(self) -> None:
        self.client.close()
