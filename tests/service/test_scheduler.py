"""The delayed-task scheduler (worker.scheduler) with real Redis as store and as Celery broker."""

from __future__ import annotations

import base64
import json
import time

import pytest
from celery import Celery

from worker import scheduler as scheduler_module
from worker.scheduler import Scheduler

QUEUE = "test-parked"


@pytest.fixture
def producer(redis_db, redis_client):
    app = Celery("test-scheduler", broker=redis_db[0], set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    redis_client.delete(QUEUE)
    yield app
    redis_client.delete(QUEUE)
    app.close()


def queued(redis_client) -> list[dict]:
    """The Celery messages waiting in the queue's Redis list (kombu's JSON envelope)."""
    return [json.loads(raw) for raw in redis_client.lrange(QUEUE, 0, -1)]


def test_a_parked_task_is_published_when_due_and_only_then(producer, redis_client):
    parked = Scheduler(redis_client, producer, "xso:scheduled")
    parked.later("deliver", {"request_id": "r1", "chat_id": 5}, QUEUE, delay_s=1.0, retries=3)
    assert 3600 < redis_client.ttl("xso:scheduled") <= 3601  # every service key expires
    assert parked.publish_due() == 0 and not queued(redis_client)
    time.sleep(1.1)
    assert parked.publish_due() == 1
    (message,) = queued(redis_client)
    assert message["headers"]["task"] == "deliver" and message["headers"]["retries"] == 3
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [] and kwargs == {"request_id": "r1", "chat_id": 5}
    assert parked.pending() == 0 and parked.publish_due() == 0  # published once


def test_an_entry_whose_publisher_died_is_published_again_after_the_lease(producer, redis_client, monkeypatch):
    monkeypatch.setattr(scheduler_module, "LEASE_S", 1.0)
    parked = Scheduler(redis_client, producer, "xso:scheduled")
    parked.later("diagnose", {"request_id": "r2"}, QUEUE, delay_s=0, retries=1)
    # A worker leased it and died before publishing: nothing is published during the lease ...
    leased = parked._lease_due(keys=[parked.key], args=[1000.0, 10])
    assert len(leased) == 1 and parked.publish_due() == 0
    time.sleep(1.1)
    assert parked.publish_due() == 1  # ... and once after it
    assert len(queued(redis_client)) == 1


def test_the_loop_publishes_in_the_background(producer, redis_client):
    parked = Scheduler(redis_client, producer, "xso:scheduled")
    stop = parked.start_loop(interval_s=0.1)
    try:
        parked.later("deliver", {"request_id": "r3"}, QUEUE, delay_s=0.3, retries=1)
        deadline = time.monotonic() + 5
        while (not queued(redis_client) or parked.pending()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
    assert len(queued(redis_client)) == 1 and parked.pending() == 0
