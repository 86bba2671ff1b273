"""A burst of replies against a fake Bot API that enforces Telegram's send limits: no 429 from our own pace.

``XSO_BURST_REPLIES`` analysed results (default 40; the issue's figure is 200) are handed to the
``deliver`` task at once, each for a different user; each reply is two messages (text, heat-map
photo). Real delivery workers (prefork, four task processes each, two workers: the shared token
bucket in Redis, ``contract.pacing``, must hold them together) send them while the fake answers
429 to anything beyond ~30 messages/s overall or ~1/s per chat, and counts those refusals.
Every reply must arrive exactly once and the fake must never have refused one.
"""

from __future__ import annotations

import os
import time

import pytest
from celery import Celery

from contract.envelope import RequestEnvelope
from contract.keys import DELIVER_TASK, DELIVERY_QUEUE

from .conftest import TOKEN
from .harness import WorkerProcess, chat_summary
from .test_delivery import PNG, analysed_result
from .test_pacing import most_in_window

pytestmark = pytest.mark.slow

BURST = int(os.environ.get("XSO_BURST_REPLIES", "40"))


def test_a_burst_of_replies_gets_no_429_from_telegram(fake, redis_db, redis_client, tmp_path):
    users = [20_000 + i for i in range(BURST)]
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": fake.url, "REDIS_URL": redis_db[0], "LOG_LEVEL": "INFO"}
    workers = [WorkerProcess(env, tmp_path / f"delivery-{n}.log", queues=DELIVERY_QUEUE, pool="prefork",
                             extra_args=("--concurrency", "4")).start(wait_for_models=False) for n in range(2)]
    producer = Celery("burst", broker=redis_db[0], set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    try:
        fake.enforce_limits()
        result = analysed_result()
        for user in users:
            request_id = f"burst-{user}"
            overlay_key = f"xso:overlay:{request_id}"
            redis_client.set(overlay_key, PNG, ex=600)
            envelope = RequestEnvelope(request_id=request_id, blob_key=f"xso:blob:{request_id}", chat_id=user,
                                       reply_to_message_id=1, language="en")
            producer.send_task(DELIVER_TASK, kwargs={"envelope": envelope.to_json(), "result": result,
                                                     "overlay_key": overlay_key}, queue=DELIVERY_QUEUE)
        fake.wait_for(lambda: all(chat_summary(fake, u).results and chat_summary(fake, u).photos for u in users),
                      timeout=60 + BURST / 5)
        time.sleep(1.0)  # a duplicate would arrive now
    finally:
        producer.close()
        for worker in workers:
            worker.stop()
    sends = [c for c in fake.calls if c.method in ("sendMessage", "sendPhoto", "sendMediaGroup")]
    accepted = [c.at for c in sends if c.status == 200]
    busiest, took = most_in_window(accepted, 1.0), max(accepted) - min(accepted)
    print(f"\ndelivery burst: {BURST} replies ({len(sends)} messages) sent within {took:.1f}s "
          f"({len(sends) / took:.1f} messages/s, at most {busiest} within one second); "
          f"429 from the limits: {fake.limit_refusals} {dict(fake.limit_refused_by)}")
    assert fake.limit_refusals == 0
    assert all(call.status == 200 for call in sends)
    for user in users:
        summary = chat_summary(fake, user)
        assert len(summary.results) == 1 and summary.overlay_sends == 1, (user, summary)
