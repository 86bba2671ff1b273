"""A worker killed mid-task (SIGKILL, no warm shutdown) loses nothing and answers once.

With ``task_acks_late`` the unacknowledged message stays in Redis and is handed to another worker
once the broker's visibility timeout has passed; the short time limits here make that timeout 23 s
(hard limit 8 s + the longest countdown Celery holds, 5 s, + 10 s). The image is marked ``slow``
(tests.service.poison_plugin) so that the worker is surely mid-task when it is killed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from model_factory import make_models_dir

from bot.dispatch import Dispatcher
from contract.envelope import RequestEnvelope
from diagnosis.messages import PHYSICIAN, gettext_for

from .conftest import worker_env
from .harness import WorkerProcess, chat_summary, sample_image
from .poison_plugin import slow

pytestmark = pytest.mark.slow

SHORT_LIMITS = {"DIAGNOSE_SOFT_TIME_LIMIT_S": "5", "DIAGNOSE_TIME_LIMIT_S": "8", "DELIVER_SOFT_TIME_LIMIT_S": "4",
                "DELIVER_TIME_LIMIT_S": "6", "MAX_RETRY_DELAY_S": "3"}


def test_task_of_a_killed_worker_is_redelivered_and_answered_once(fake, redis_db, redis_client, make_settings,
                                                                   tmp_path):
    chat = 901
    models = make_models_dir(tmp_path / "models")
    env = {**worker_env(fake.url, redis_db[0], models), **SHORT_LIMITS}
    settings = make_settings(**SHORT_LIMITS)
    assert settings.visibility_timeout_s == 23

    # The first worker takes the task and is killed while it runs.
    plugin = ("--include", "tests.service.poison_plugin")
    first = WorkerProcess(env, tmp_path / "first.log", extra_args=plugin).start()
    try:
        redis_client.set(settings.keys.blob("killed"), slow(sample_image("chest")), ex=600)
        dispatcher = Dispatcher(settings)
        dispatcher.enqueue_sync(RequestEnvelope(request_id="killed", blob_key=settings.keys.blob("killed"),
                                                chat_id=chat, reply_to_message_id=1, language="en"))
        dispatcher.close()
        fake.wait_for(lambda: "poison plugin: slow" in first.log(), timeout=60)
        os.kill(first.process.pid, signal.SIGKILL)  # the real PID: no shell in between
        first.process.wait(10)
        killed_at = time.monotonic()
    finally:
        first.stop()
    assert "request killed: analysed" not in first.log()  # it really died mid-task
    assert not fake.texts_to(chat)

    second = WorkerProcess(env, tmp_path / "second.log", extra_args=plugin).start()
    try:
        physician = gettext_for("en")(PHYSICIAN)
        fake.wait_for(lambda: chat_summary(fake, chat).overlay_sends, timeout=90)
        waited = time.monotonic() - killed_at
        time.sleep(1.0)
    finally:
        second.stop()
    assert len([t for t in fake.texts_to(chat) if physician in t]) == 1
    assert chat_summary(fake, chat).overlay_sends == 1  # one photo or one album, never twice
    assert waited >= settings.visibility_timeout_s - 2  # it came back through the visibility timeout
