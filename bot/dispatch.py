"""Enqueue the analysis by task *name*: the bot never imports the worker package or torch.

The task gets JSON arguments only (ids, language, the Redis key of the image), never bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from celery import Celery

from diagnosis.settings import DIAGNOSE_TASK, INFERENCE_QUEUE, ServiceSettings


@dataclass(frozen=True)
class DiagnoseRequest:
    """The ``diagnose`` task's keyword arguments (the worker's signature must accept exactly these)."""

    request_id: str
    blob_key: str
    chat_id: int
    reply_to_message_id: int
    language: str
    ack_message_id: int | None = None


def make_client(settings: ServiceSettings) -> Celery:
    """A producer-only Celery app with the same serialisation rules as the workers."""
    client = Celery("xray-bot", broker=settings.broker_url, set_as_current=False)
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

    def enqueue_sync(self, request: DiagnoseRequest) -> str:
        result = self.client.send_task(DIAGNOSE_TASK, kwargs=asdict(request), queue=INFERENCE_QUEUE, retry=True)
        return result.id

    async def enqueue(self, request: DiagnoseRequest) -> str:
        """Publish without blocking the event loop (kombu's producer pool is thread-safe)."""
        return await asyncio.to_thread(self.enqueue_sync, request)

    def close(self) -> None:
        self.client.close()
