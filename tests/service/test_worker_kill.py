"""A worker SIGKILLed while ``XSO_FAULT_REQUESTS`` requests are in flight: every one is answered exactly once.

Real bot, real Redis, real Celery workers (solo pool, the whole worker dies as in an OOM kill), with
the production time limits. The killed worker's unacknowledged task comes back through the broker's
visibility timeout (45 s by default: hard limit 30 s + the longest countdown Celery holds, 5 s,
+ 10 s; see ``ServiceSettings.visibility_timeout_s``; longer retry countdowns are parked in Redis by
``worker.scheduler``), the queued ones are taken by the replacement worker at once, and delivery is
idempotent, so nothing is lost and nothing is sent twice. The last answer must come at most 90 s
after the kill (the goal is 60 s); the measured time is printed (``pytest -s``).
"""

from __future__ import annotations

import re
import time

import pytest
from model_factory import make_models_dir

from .conftest import FAULT_REQUESTS, worker_env
from .harness import WorkerProcess, chat_summary, sample_image
from .poison_plugin import slow

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
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
    env = worker_env(fake.url, redis_db[0], models)
    plugin = ("--include", "tests.service.poison_plugin")  # slow(): the first image keeps the worker busy
    first = WorkerProcess(env, tmp_path / "first.log", extra_args=plugin).start()
    with start_bot() as bot:
        visibility_timeout = bot.settings.visibility_timeout_s
        assert visibility_timeout == 45
        try:
            for user in users:
                fake.inject_photo(user, slow(CHEST) if user == users[0] else CHEST)
            # Kill while a task runs (received, not finished), with more requests still queued.
            fake.wait_for(lambda: "poison plugin: slow" in first.log(), timeout=60, interval=0.01)
            killed = in_flight(first.log())
            assert killed, first.log()[-2000:]
            first.kill()
            killed_at = time.monotonic()
        finally:
            first.stop()
        answered_before = [u for u in users if chat_summary(fake, u).results]
        assert len(answered_before) < len(users), "every request was answered before the kill"

        second = WorkerProcess(env, tmp_path / "second.log", extra_args=plugin).start()
        try:
            fake.wait_for(lambda: all(chat_summary(fake, u).results and chat_summary(fake, u).photos for u in users),
                          timeout=90 + 5 * len(users))
            waited = time.monotonic() - killed_at
            time.sleep(2.0)  # a duplicate would arrive now
        finally:
            second.stop()
    once = sum(len(chat_summary(fake, u).results) == 1 and chat_summary(fake, u).overlay_sends == 1 for u in users)
    print(f"\nworker SIGKILL: {once}/{len(users)} answered exactly once, {len(answered_before)} before the kill; "
          f"last answer {waited:.1f}s after the kill (visibility timeout {visibility_timeout}s)")
    for user in users:
        summary = chat_summary(fake, user)
        assert len(summary.results) == 1 and summary.overlay_sends == 1, (user, summary)
    # The task that was running when the worker died came back and was run by the second worker.
    assert set(killed) <= {task_id for _, task_id, event in TASK_LINE.findall(second.log()) if event == "received"}
    assert visibility_timeout - 2 <= waited <= 90  # through the visibility timeout, and soon after it
    assert not list(redis_client.scan_iter("xso:blob:*"))  # every image deleted once answered
