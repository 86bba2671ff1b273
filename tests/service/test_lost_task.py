"""A task message the broker lost (taken off its queue, never recorded as unacknowledged) is enqueued
again by the bot's watchdog, and the user still gets exactly one answer.

The loss is made deterministic by taking the message off the Redis list the way a worker's BRPOP
does, and throwing it away: what happens when a thread-pool worker is SIGKILLed in that instant
(docs/performance.md, the batched worker). Real bot, real Redis, real Celery workers; ``PENDING_CHECK_S`` short.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from model_factory import make_models_dir

from bot.inflight import QUEUES, message_request_id
from contract.keys import DELIVERY_QUEUE, INFERENCE_QUEUE

from .conftest import worker_env
from .harness import WorkerProcess, chat_summary, sample_image

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
CHECK_S = 0.5


@pytest.fixture
def empty_queues(redis_client):
    names = [*QUEUES, "unacked", "unacked_index"]
    redis_client.delete(*names)
    yield redis_client
    redis_client.delete(*names)


def envelope_of(raw: bytes) -> dict:
    return json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["envelope"]


def steal(fake, redis_client, queue: str) -> bytes:
    """Wait for one message on ``queue`` and take it off for good (as a BRPOP before a SIGKILL)."""
    fake.wait_for(lambda: redis_client.llen(queue), timeout=60)
    raw = redis_client.rpop(queue)
    assert message_request_id(raw)
    return raw


def wait_for_requeue(fake, redis_client, queue: str, stolen: bytes) -> None:
    """The watchdog's new message carries the same envelope as the stolen one."""
    fake.wait_for(lambda: redis_client.llen(queue), timeout=10 * CHECK_S + 30)
    again = redis_client.lindex(queue, -1)
    assert envelope_of(again) == envelope_of(stolen)


def assert_answered_once(fake, redis_client, user: int) -> None:
    summary = chat_summary(fake, user)
    assert len(summary.results) == 1 and summary.overlay_sends == 1, summary
    assert not summary.told_to_resend, summary
    assert not list(redis_client.scan_iter("xso:blob:*"))  # the image deleted once answered


def test_a_lost_diagnose_message_is_enqueued_again_and_answered_once(fake, redis_db, empty_queues, start_bot,
                                                                      tmp_path):
    redis_client, user = empty_queues, 1501
    env = worker_env(fake.url, redis_db[0], make_models_dir(tmp_path / "models"))
    with start_bot(PENDING_CHECK_S=CHECK_S):
        fake.inject_photo(user, CHEST)
        stolen = steal(fake, redis_client, INFERENCE_QUEUE)  # no worker yet: the message waits on the list
        assert not redis_client.llen(INFERENCE_QUEUE) and not redis_client.hlen("unacked")
        wait_for_requeue(fake, redis_client, INFERENCE_QUEUE, stolen)
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            fake.wait_for(lambda: chat_summary(fake, user).results and chat_summary(fake, user).photos, timeout=90)
            time.sleep(2.0)  # a duplicate would arrive now
        finally:
            worker.stop()
    assert_answered_once(fake, redis_client, user)


def test_a_lost_deliver_message_is_analysed_again_and_answered_once(fake, redis_db, empty_queues, start_bot,
                                                                     tmp_path):
    """``diagnose`` finished, its ``deliver`` was lost: the bot enqueues ``diagnose`` again."""
    redis_client, user = empty_queues, 1502
    env = worker_env(fake.url, redis_db[0], make_models_dir(tmp_path / "models"))
    inference = WorkerProcess(env, tmp_path / "inference.log", queues=INFERENCE_QUEUE).start()
    try:
        with start_bot(PENDING_CHECK_S=CHECK_S):
            fake.inject_photo(user, CHEST)
            stolen = steal(fake, redis_client, DELIVERY_QUEUE)  # no delivery worker yet
            wait_for_requeue(fake, redis_client, DELIVERY_QUEUE, stolen)  # analysed again, handed over again
            delivery = WorkerProcess(env, tmp_path / "delivery.log", queues=DELIVERY_QUEUE).start(
                wait_for_models=False)
            try:
                fake.wait_for(lambda: chat_summary(fake, user).results and chat_summary(fake, user).photos,
                              timeout=60)
                time.sleep(2.0)  # a duplicate would arrive now
            finally:
                delivery.stop()
    finally:
        inference.stop()
    assert_answered_once(fake, redis_client, user)
    # Analysed twice: before the loss and after the watchdog's re-enqueue.
    assert len(re.findall(r"Task diagnose\[[0-9a-f-]+\] succeeded", inference.log())) == 2
