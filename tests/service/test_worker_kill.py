"""A worker SIGKILLed while ``XSO_FAULT_REQUESTS`` requests are in flight: every one is answered exactly once.

Real bot, real Redis, real Celery workers (solo pool, the whole worker dies as in an OOM kill).
The killed worker's unacknowledged task comes back through the broker's visibility timeout
(21 s with these limits, see ``ServiceSettings.visibility_timeout_s``), the queued ones are taken by
the replacement worker at once, and delivery is idempotent, so nothing is lost and nothing is sent twice.
"""

from __future__ import annotations

import re
import time

import pytest
from model_factory import make_models_dir

from .conftest import FAULT_REQUESTS, worker_env
from .harness import WorkerProcess, chat_summary, sample_image

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
SHORT_LIMITS = {"DIAGNOSE_SOFT_TIME_LIMIT_S": "5", "DIAGNOSE_TIME_LIMIT_S": "8", "DELIVER_SOFT_TIME_LIMIT_S": "4",
                "DELIVER_TIME_LIMIT_S": "6", "MAX_RETRY_DELAY_S": "3"}
TASK_LINE = re.compile(r"Task (diagnose|deliver)\[([0-9a-f-]+)\] (received|succeeded|retry)")


def in_flight(log: str) -> set[str]:
    """Ids of tasks the worker received and has not finished (succeeded or handed to a retry)."""
    received, finished = set(), set()
    for _, task_id, event in TASK_LINE.findall(log):
        (received if event == "received" else finished).add(task_id)
    return received - finished


def test_sigkill_with_requests_in_flight_answers_each_exactly_once(fake, redis_db, redis_client, start_bot,
                                                                  tmp_path):
    users = [1400 + i for i in range(max(FAULT_REQUESTS, 2))]
    models = make_models_dir(tmp_path / "models")
    env = {**worker_env(fake.url, redis_db[0], models), **SHORT_LIMITS}
    first = WorkerProcess(env, tmp_path / "first.log").start()
    with start_bot(**SHORT_LIMITS) as bot:
        assert bot.settings.visibility_timeout_s == 21
        try:
            for user in users:
                fake.inject_photo(user, CHEST)
            # Kill while a task runs (received, not finished), with more requests still queued.
            killed = fake.wait_for(lambda: in_flight(first.log()), timeout=60, interval=0.01)
            first.kill()
            killed_at = time.monotonic()
        finally:
            first.stop()
        answered_before = [u for u in users if chat_summary(fake, u).results]
        assert len(answered_before) < len(users), "every request was answered before the kill"

        second = WorkerProcess(env, tmp_path / "second.log").start()
        try:
            fake.wait_for(lambda: all(chat_summary(fake, u).results and chat_summary(fake, u).photos for u in users),
                          timeout=90 + 5 * len(users))
            waited = time.monotonic() - killed_at
            time.sleep(2.0)  # a duplicate would arrive now
        finally:
            second.stop()
    for user in users:
        summary = chat_summary(fake, user)
        assert len(summary.results) == 1 and summary.photos == 1, (user, summary)
    # The task that was running when the worker died came back and was run by the second worker.
    assert set(killed) <= {task_id for _, task_id, event in TASK_LINE.findall(second.log()) if event == "received"}
    assert waited >= 21 - 2  # through the visibility timeout, not by luck
    assert not list(redis_client.scan_iter("xso:blob:*"))  # every image deleted once answered
