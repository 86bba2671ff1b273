"""Twelve photos from one chat within three seconds (issue #22, part 5), end to end.

Real bot, real Redis, a real inference worker (random-weight models forcing the chest route) and
real delivery workers (prefork, three task processes: deliveries run in parallel and compete for the
chat's send slots, as in production), against a fake Bot API that refuses, like Telegram, messages
over its send limits. The user's rate limit is 10 images per 10 minutes, so 10 images are accepted
and 2 refused. Each accepted image must be acknowledged (one message may cover several: the burst's
acknowledgement is edited as images join), no acknowledgement may fail on our own pacing
(``RetryAfter``) and Telegram must refuse nothing; every accepted image is answered exactly once,
and the answers arrive in the order the images were sent.
"""

from __future__ import annotations

import logging
import re
import time

import pytest
from model_factory import make_models_dir

from contract.keys import DELIVERY_QUEUE, INFERENCE_QUEUE

from .conftest import worker_env
from .harness import WorkerProcess, chat_summary, sample_image

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
PHOTOS = 12
ACK = re.compile(r"^Received(?:, analysing…| (\d+) images?, analysing…)")


def acknowledged(fake, chat_id: int) -> tuple[int, list[int]]:
    """(images the chat's acknowledgements cover, each one's count as last shown) from the calls:
    every acknowledgement message, at its last text (the send or its latest edit)."""
    latest: dict[int, str] = {}
    for call in sorted(fake.calls_of("sendMessage", chat_id) + fake.calls_of("editMessageText", chat_id),
                       key=lambda c: c.at):
        text = str(call.params.get("text", ""))
        message_id = int(call.params.get("message_id") or call.result["message_id"])
        if ACK.match(text) or message_id in latest:
            latest[message_id] = text
    counts = []
    for text in latest.values():
        match = ACK.match(text)
        assert match, text  # an acknowledgement turned into something else (a notice)
        counts.append(int(match.group(1) or 1))
    return sum(counts), counts


@pytest.fixture
def workers(fake, redis_db, tmp_path):
    env = worker_env(fake.url, redis_db[0], make_models_dir(tmp_path / "models"))
    started = [WorkerProcess(env, tmp_path / "inference.log", queues=INFERENCE_QUEUE).start()]
    try:
        started.append(WorkerProcess(env, tmp_path / "delivery.log", queues=DELIVERY_QUEUE, pool="prefork",
                                     extra_args=("--concurrency", "3")).start(wait_for_models=False))
        yield started
    finally:
        for worker in started:
            worker.stop()


def test_a_burst_of_twelve_photos_is_acknowledged_and_answered_in_order(workers, start_bot, fake, redis_client,
                                                                         caplog):
    user = 2201
    caplog.set_level(logging.INFO)
    fake.enforce_limits()
    sent_at = time.monotonic()
    with start_bot(RATE_LIMIT_IMAGES=10, RATE_LIMIT_WINDOW_S=600):
        photos = []
        for _ in range(PHOTOS):  # 12 photos within 3 s
            photos.append(fake.inject_photo(user, CHEST, forwarded=True))
            time.sleep(3.0 / PHOTOS)
        fake.wait_for(lambda: len(chat_summary(fake, user).results) >= 10, timeout=150)
        answered_at = time.monotonic()
        fake.wait_for(lambda: fake.calls_of("deleteMessage", user), timeout=20)  # the last answer replaces the ack
        time.sleep(1.5)  # a duplicate would arrive now
    summary = chat_summary(fake, user)
    accepted = len(fake.calls_of("getFile"))
    covered, counts = acknowledged(fake, user)
    results = sorted((c for c in fake.calls_of("sendMessage", user) if c.params["text"] in summary.results),
                     key=lambda c: c.at)
    answered = [int(c.params["reply_parameters"]["message_id"]) for c in results]
    print(f"\nburst from one chat: {PHOTOS} photos, {accepted} accepted, acknowledged by {len(counts)} message(s) "
          f"covering {counts}, {len(fake.calls_of('editMessageText', user))} edits; answered within "
          f"{answered_at - sent_at:.1f}s; 429 from the limits: {fake.limit_refusals}")

    assert accepted == 10  # the user's rate limit: 10 images per 10 minutes
    assert any("2 images were not accepted" in t for t in fake.texts_to(user)
               + [str(c.params.get("text")) for c in fake.calls_of("editMessageText", user)])
    # Every accepted image acknowledged (one message may cover several), nothing dropped by our pacing.
    assert covered == accepted, counts
    assert not [r for r in caplog.records if "acknowledgement failed" in r.getMessage()
                or "RetryAfter" in r.getMessage()]
    assert fake.limit_refusals == 0 and all(c.status != 429 for c in fake.calls)
    # Every accepted image answered exactly once, in the order the images were sent.
    assert len(summary.results) == accepted and summary.overlay_sends == accepted, summary
    assert len(set(answered)) == accepted and answered == sorted(answered), answered
    assert set(answered) <= {photo["message_id"] for photo in photos}
    # The answers replaced the acknowledgement: deleted once, after the last answer.
    deletes = fake.calls_of("deleteMessage", user)
    assert len(deletes) == len(counts) and deletes[-1].at > results[-1].at
    assert not redis_client.keys("xso:turns:*") and not redis_client.keys("xso:ack*")
