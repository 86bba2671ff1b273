"""Redis restarted under load: the bot keeps running, nobody waits in silence, nothing is answered twice.

A private ``redis-server`` (free port, a password as in docker-compose.yml, no persistence, as in
production) carries the broker and the service's keys for a real bot and a real worker; the shared
Redis on 6379 is never touched. It is SIGKILLed while ``XSO_FAULT_REQUESTS`` requests are queued or
being analysed, and started again on the same port, empty. Then:

* every request accepted before the restart gets exactly one of: its answer, or "please send it
  again" (the bot's watchdog, ``bot.pending``, notices that the task and the image are gone);
* a request sent while Redis is down is answered or told to try again;
* requests sent after the restart are answered, by the same bot and worker processes (they
  reconnect by themselves); no request gets two answers.
"""

from __future__ import annotations

import time

import pytest
from model_factory import make_models_dir

from .conftest import FAULT_REQUESTS, TOKEN, worker_env
from .harness import BotRunner, PrivateRedis, WorkerProcess, chat_summary, sample_image, service_settings

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
LIMITS = {"DIAGNOSE_SOFT_TIME_LIMIT_S": "3", "DIAGNOSE_TIME_LIMIT_S": "5", "DELIVER_SOFT_TIME_LIMIT_S": "4",
          "DELIVER_TIME_LIMIT_S": "6", "MAX_RETRY_DELAY_S": "3"}


def settled(fake, user: int) -> bool:
    summary = chat_summary(fake, user)
    return bool((summary.results and summary.photos) or summary.notices)


def standing_acks(fake, chat_id: int) -> list[int]:
    """Message ids of the chat's acknowledgements that were neither deleted nor edited into a notice."""
    from contract.texts import translator

    received = translator("en")[0]("Received, analysing…")
    sent = [int(c.result["message_id"]) for c in fake.calls_of("sendMessage", chat_id)
            if str(c.params.get("text", "")).startswith(received)]
    gone = {int(c.params["message_id"]) for c in fake.calls_of("deleteMessage", chat_id)}
    edited = {int(c.params["message_id"]) for c in fake.calls_of("editMessageText", chat_id)
              if not str(c.params.get("text", "")).startswith(received)}
    return [message for message in sent if message not in gone | edited]


def test_redis_restart_under_load(fake, tmp_path):
    before = [1500 + i for i in range(max(FAULT_REQUESTS, 3))]
    during, after = 1550, [1560 + i for i in range(max(FAULT_REQUESTS // 2, 2))]
    redis_server = PrivateRedis(tmp_path / "redis").start()
    worker = None
    try:
        models = make_models_dir(tmp_path / "models")
        worker = WorkerProcess({**worker_env(fake.url, redis_server.url, models), **LIMITS},
                               tmp_path / "worker.log").start()
        settings = service_settings(fake.url, TOKEN, redis_server.url, PENDING_CHECK_S=0.5, **LIMITS)
        with BotRunner(settings):
            for user in before:
                fake.inject_photo(user, CHEST)
            fake.wait_for(lambda: all(chat_summary(fake, u).acks for u in before), timeout=30)
            time.sleep(0.3)  # some analysed, some queued
            answered_before_restart = sum(bool(chat_summary(fake, u).results) for u in before)

            redis_server.kill()
            fake.inject_photo(during, CHEST)
            time.sleep(1.5)
            redis_server.start()  # same port, empty

            for user in after:
                fake.inject_photo(user, CHEST)
            grace = settings.lost_grace_s
            fake.wait_for(lambda: all(settled(fake, u) for u in [*before, during, *after]),
                          timeout=grace + 60 + 5 * len(before))
            time.sleep(2.0)  # a duplicate, or an answer after a "send it again", would arrive now
        assert worker.process is not None and worker.process.poll() is None  # no restart needed
    finally:
        if worker is not None:
            worker.stop()
        redis_server.kill()

    lost = 0
    for user in [*before, during]:
        summary = chat_summary(fake, user)
        assert len(summary.results) <= 1 and summary.overlay_sends <= 1, (user, summary)
        assert summary.results or summary.notices, (user, summary)  # nobody waits in silence
        # Never both: a delivery that sent its answer while Redis was down waits for it to come back
        # and writes the done mark (worker.deliver.mark_answered), so the watchdog does not claim it.
        assert not (summary.results and summary.notices), ("answered and told 'send it again'", user, summary)
        lost += bool(summary.notices) and not summary.results
    for user in after:
        summary = chat_summary(fake, user)
        assert len(summary.results) == 1 and summary.overlay_sends == 1 and not summary.notices, (user, summary)
    for user in [*before, during, *after]:
        # An answered chat keeps no "Received, analysing…": answers delivered after the restart could not
        # find it (the burst's state was wiped), so the bot that sent it deletes it (bot.pending).
        if chat_summary(fake, user).results:
            assert not standing_acks(fake, user), (user, standing_acks(fake, user))
    assert answered_before_restart < len(before), "the restart came after everything was answered"
    assert lost >= 1, "no request was caught by the restart"
