"""The bot's watchdog for accepted requests that were lost (bot/pending.py), against a real Redis.

End to end it runs in test_redis_restart.py; here each rule on its own, with a stub Bot API.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from telegram.error import BadRequest

from bot.acks import BurstAcks
from bot.dispatch import Dispatcher
from bot.inflight import QUEUES, UNACKED, message_request_id, request_ids_in_flight
from bot.pending import MAX_REQUEUES, PendingRequest, PendingRequests
from bot.store import Store
from contract.envelope import RequestEnvelope
from contract.keys import DELIVER_TASK, DELIVERY_QUEUE, DIAGNOSE_TASK, INFERENCE_QUEUE
from contract.texts import lost as lost_text
from worker.deliver import send_reply
from worker.scheduler import Scheduler

from .harness import PrivateRedis, delete_service_keys

CHAT = 1801


class StubBot:
    def __init__(self, deleted: set[int] = frozenset()):
        self.deleted = set(deleted)
        self.edits: list[tuple[int, str]] = []
        self.sent: list[tuple[int, str]] = []
        self.deletions: list[tuple[int, int]] = []

    async def edit_message_text(self, text, chat_id, message_id):
        if message_id in self.deleted:
            raise BadRequest("Message to edit not found")
        self.edits.append((message_id, text))

    async def send_message(self, chat_id, text, reply_parameters=None):
        self.sent.append((reply_parameters.message_id, text))

    async def delete_message(self, chat_id, message_id):
        self.deletions.append((chat_id, message_id))


def envelope(request_id: str, ack: int | None = 500, chat_id: int = CHAT, language: str = "ru") -> RequestEnvelope:
    return RequestEnvelope(request_id=request_id, blob_key=f"xso:blob:{request_id}", chat_id=chat_id,
                           reply_to_message_id=7, ack_message_id=ack, language=language)


def request(request_id: str, ack: int | None = 500) -> PendingRequest:
    return PendingRequest(envelope=envelope(request_id, ack), user_id=CHAT, accepted_at=0.0)


def rounds(settings, bot: StubBot, requests: list[PendingRequest], times: list[float], requeue=None):
    """Run watchdog rounds at the given (monotonic) times; returns (ids told per round, pending left)."""

    async def main():
        store = Store(settings)
        pending = PendingRequests(settings, store, requeue=requeue)
        for item in requests:
            pending.add(item)
        told = [await pending.check(bot, now=now) for now in times]
        await store.close()
        return told, len(pending)

    return asyncio.run(main())


async def acknowledged_burst(store: Store, settings, message_id: int, *request_ids: str) -> tuple[BurstAcks, str]:
    """The requests joined one burst, and this bot sent its acknowledgement (as message ``message_id``)."""

    class AckBot(StubBot):
        async def send_message(self, chat_id, text, reply_parameters=None):
            return SimpleNamespace(message_id=message_id)

    acks = BurstAcks(store.redis, settings.keys, merge_s=5.0, ttl_s=60)
    burst, _count, opened = await acks.join(CHAT, request_ids[0])
    for request_id in request_ids[1:]:
        await acks.join(CHAT, request_id)
    acks.acknowledge(AckBot(), CHAT, burst, opened, 7, "ru", 0)
    await asyncio.gather(*acks._flushers.values())
    return acks, burst


def test_queued_and_answered_requests_are_left_alone(make_settings, redis_client):
    settings = make_settings()
    keys = settings.keys
    redis_client.set(keys.blob("queued"), b"image", ex=60)
    redis_client.set(keys.done("answered"), "1", ex=60)
    bot = StubBot()
    told, left = rounds(settings, bot, [request("queued"), request("answered")], [1.0, 1.0 + settings.lost_grace_s * 2])
    assert told == [[], []] and left == 1  # the queued one stays watched, the answered one is dropped
    assert not bot.edits and not bot.sent


def test_a_lost_request_is_claimed_after_the_grace_time_and_the_user_told(make_settings, redis_client):
    settings = make_settings()
    bot = StubBot()
    grace = settings.lost_grace_s
    told, left = rounds(settings, bot, [request("lost")], [1.0, 1.0 + grace - 1, 1.0 + grace])
    assert told == [[], [], ["lost"]] and left == 0
    assert bot.edits == [(500, lost_text("ru"))] and not bot.sent
    assert redis_client.get(settings.keys.done("lost")) == b"lost"
    assert 0 < redis_client.ttl(settings.keys.done("lost")) <= settings.MARK_TTL_S


def test_a_late_worker_result_is_not_sent_after_the_claim(make_settings, redis_client, fake):
    from worker.telegram_out import TelegramOut

    settings = make_settings()
    rounds(settings, StubBot(), [request("late")], [1.0, 1.0 + settings.lost_grace_s])
    out = TelegramOut(settings)
    try:
        sent = send_reply(redis_client, out, settings, envelope("late", ack=None, language="en"), failure="apology")
    finally:
        out.close()
    assert sent == [] and not fake.texts_to(CHAT)


def test_no_claim_while_a_delivery_holds_the_lock(make_settings, redis_client):
    settings = make_settings()
    redis_client.set(settings.keys.lock("delivering"), "worker", ex=60)
    bot = StubBot()
    told, left = rounds(settings, bot, [request("delivering")], [1.0, 1.0 + settings.lost_grace_s])
    assert told == [[]] * 2 and left == 0
    assert not bot.edits and not bot.sent and not redis_client.exists(settings.keys.done("delivering"))


def test_answered_before_redis_forgot_it_means_the_acknowledgement_is_gone_and_nothing_is_sent(make_settings):
    settings = make_settings()
    bot = StubBot(deleted={500})  # the worker deleted the acknowledgement when it answered
    told, _ = rounds(settings, bot, [request("answered-then-wiped")], [1.0, 1.0 + settings.lost_grace_s])
    assert told == [[], []] and not bot.edits and not bot.sent


def test_a_burst_acknowledgement_sent_after_the_request_was_queued_is_remembered_across_a_redis_wipe(
        make_settings, redis_client):
    """The burst's acknowledgement is sent in the background, after the request was queued, so the
    envelope carries no message id. Answered, then Redis forgot everything (a restart): the watchdog
    edits the acknowledgement this bot sent, finds it deleted by the answer, and says nothing."""
    settings = make_settings()

    async def main():
        store = Store(settings)
        acks, burst = await acknowledged_burst(store, settings, 500, "answered-in-a-burst")
        delete_service_keys(redis_client)  # the restart: done marks and burst state are gone
        pending = PendingRequests(settings, store, acks=acks)
        pending.add(PendingRequest(envelope=envelope("answered-in-a-burst", ack=None), user_id=CHAT,
                                   accepted_at=0.0, burst=burst))
        bot = StubBot(deleted={500})  # the answer deleted the acknowledgement
        told = [await pending.check(bot, now=now) for now in (1.0, 1.0 + settings.lost_grace_s)]
        await store.close()
        return told, bot

    told, bot = asyncio.run(main())
    assert told == [[], []] and not bot.edits and not bot.sent


@pytest.mark.parametrize("restarted", [True, False])
def test_a_burst_answered_after_a_redis_restart_loses_its_acknowledgement(make_settings, tmp_path, restarted):
    """Redis restarted (empty, a new run id) between the burst's acknowledgement and its answers: the
    answers found no acknowledgement to delete, so the bot, which remembers it, deletes it once every
    request of the burst is answered. Without a restart the answers deleted it: the bot does nothing."""
    server = PrivateRedis(tmp_path / "redis").start()
    settings = make_settings(REDIS_URL=server.url)

    async def main():
        store = Store(settings)
        acks, burst = await acknowledged_burst(store, settings, 600, "first", "second")
        if restarted:
            server.restart()
        pending = PendingRequests(settings, store, acks=acks)
        for request_id in ("first", "second"):
            pending.add(PendingRequest(envelope=envelope(request_id, ack=None), user_id=CHAT, accepted_at=0.0,
                                       burst=burst))
        bot = StubBot()
        await store.redis.set(settings.keys.done("first"), "1", ex=60)  # answered after the restart
        await pending.check(bot, now=1.0)
        deleted_while_one_waits = list(bot.deletions)
        await store.redis.set(settings.keys.done("second"), "1", ex=60)
        await pending.check(bot, now=2.0)
        await store.close()
        return deleted_while_one_waits, bot

    try:
        deleted_while_one_waits, bot = asyncio.run(main())
    finally:
        server.kill()
    assert deleted_while_one_waits == []  # the second image still waits under it
    assert bot.deletions == ([(CHAT, 600)] if restarted else [])
    assert not bot.edits and not bot.sent


def test_without_an_acknowledgement_the_user_gets_a_reply(make_settings):
    settings = make_settings()
    bot = StubBot()
    told, _ = rounds(settings, bot, [request("no-ack", ack=None)], [1.0, 1.0 + settings.lost_grace_s])
    assert told == [[], ["no-ack"]] and bot.sent == [(7, lost_text("ru"))]


def test_forget_stops_watching_the_users_requests(make_settings):
    settings = make_settings()

    async def main():
        store = Store(settings)
        pending = PendingRequests(settings, store)
        pending.add(request("a"))
        pending.add(PendingRequest(envelope("b", ack=None, chat_id=99, language="en"), 99, 0.0))
        pending.forget_user(CHAT)
        await store.close()
        return len(pending)

    assert asyncio.run(main()) == 1


# ------------------------------------------------------------- tasks the broker lost (bot.inflight)
@pytest.fixture
def no_tasks(redis_client):
    names = [*QUEUES, UNACKED, "unacked_index"]
    redis_client.delete(*names)
    yield redis_client
    redis_client.delete(*names)


def in_flight(settings) -> set[str]:
    async def main():
        store = Store(settings)
        try:
            return await request_ids_in_flight(store.broker, store.redis, settings.keys.scheduled())
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_task_is_found_on_its_queue_held_by_a_worker_or_parked(make_settings, no_tasks):
    settings, r = make_settings(), no_tasks
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.enqueue_sync(envelope("queued"))
        dispatcher.enqueue_sync(envelope("held"))
        dispatcher.client.send_task(DELIVER_TASK, kwargs={"envelope": envelope("delivering").to_json()},
                                    queue=DELIVERY_QUEUE)
    finally:
        dispatcher.close()
    # A worker took "held": kombu keeps [message, exchange, routing key] under its delivery tag.
    held = r.lpop(INFERENCE_QUEUE)
    assert message_request_id(held) == "held"
    r.hset(UNACKED, "tag-1", json.dumps([json.loads(held), "inference", "inference"]))
    Scheduler(r, None, settings.keys.scheduled()).later(DELIVER_TASK, {"envelope": envelope("parked").to_json()},
                                                         DELIVERY_QUEUE, 60.0, 1)
    assert in_flight(settings) == {"queued", "held", "delivering", "parked"}
    r.hdel(UNACKED, "tag-1")  # the BRPOP-then-SIGKILL loss: on no list, not unacknowledged
    assert in_flight(settings) == {"queued", "delivering", "parked"}
    # A message of a format this code cannot read might be any request's task: nothing is provably lost.
    r.rpush(INFERENCE_QUEUE, b"not a celery message")
    assert in_flight(settings) is None


def test_with_a_broker_of_its_own_the_queues_are_read_there(make_settings, no_tasks, tmp_path):
    """``CELERY_BROKER_URL`` apart from ``REDIS_URL``: queues and ``unacked`` on the broker, the
    scheduler's set beside the images."""
    broker = PrivateRedis(tmp_path / "broker").start()
    try:
        settings = make_settings(CELERY_BROKER_URL=broker.url)
        dispatcher = Dispatcher(settings)
        try:
            dispatcher.enqueue_sync(envelope("on-the-broker"))
        finally:
            dispatcher.close()
        Scheduler(no_tasks, None, settings.keys.scheduled()).later(
            DIAGNOSE_TASK, {"envelope": envelope("parked").to_json()}, INFERENCE_QUEUE, 60.0, 1)
        assert not no_tasks.llen(INFERENCE_QUEUE)
        assert in_flight(settings) == {"on-the-broker", "parked"}
    finally:
        broker.kill()


class Requeues:
    def __init__(self):
        self.envelopes: list[RequestEnvelope] = []

    async def __call__(self, request: RequestEnvelope) -> None:
        self.envelopes.append(request)


def test_a_vanished_task_is_enqueued_again_after_two_checks_only(make_settings, no_tasks):
    settings, r = make_settings(), no_tasks
    r.set(settings.keys.blob("vanished"), b"image", ex=60)
    r.set(settings.keys.blob("queued"), b"image", ex=60)
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.enqueue_sync(envelope("queued"))
    finally:
        dispatcher.close()
    requeues, bot = Requeues(), StubBot()
    told, left = rounds(settings, bot, [request("vanished"), request("queued")], [1.0, 2.0], requeues)
    assert told == [[], []] and left == 2
    assert requeues.envelopes == [envelope("vanished")]  # the same envelope, once, after the second check
    assert not bot.edits and not bot.sent


def test_a_task_seen_again_between_checks_is_not_enqueued(make_settings, no_tasks):
    """Moving between two places takes an instant: one miss is not a loss."""
    settings, r = make_settings(), no_tasks
    r.set(settings.keys.blob("moving"), b"image", ex=60)
    requeues = Requeues()

    async def main():
        store = Store(settings)
        pending = PendingRequests(settings, store, requeue=requeues)
        pending.add(request("moving"))
        await pending.check(StubBot(), now=1.0)  # missed once
        dispatcher = Dispatcher(settings)
        await dispatcher.enqueue(envelope("moving"))  # … then seen
        dispatcher.close()
        await pending.check(StubBot(), now=2.0)
        r.delete(INFERENCE_QUEUE)
        await pending.check(StubBot(), now=3.0)  # missed once more: the count started again
        await store.close()

    asyncio.run(main())
    assert requeues.envelopes == []


def test_after_two_requeues_the_next_loss_is_told_and_the_image_deleted(make_settings, no_tasks):
    settings, r = make_settings(), no_tasks
    r.set(settings.keys.blob("cursed"), b"image", ex=60)
    requeues, bot = Requeues(), StubBot()
    told, left = rounds(settings, bot, [request("cursed")], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], requeues)
    assert len(requeues.envelopes) == MAX_REQUEUES == 2
    assert told == [[], [], [], [], [], ["cursed"], []] and left == 0
    assert bot.edits == [(500, lost_text("ru"))] and not bot.sent
    assert r.get(settings.keys.done("cursed")) == b"lost"  # a late worker result is skipped
    assert not r.exists(settings.keys.blob("cursed"))


def test_an_answered_request_is_never_enqueued_again(make_settings, no_tasks):
    settings, r = make_settings(), no_tasks
    r.set(settings.keys.blob("answered"), b"image", ex=60)  # not yet cleaned up
    r.set(settings.keys.done("answered"), "1", ex=60)
    requeues = Requeues()
    told, left = rounds(settings, StubBot(), [request("answered")], [1.0, 2.0, 3.0], requeues)
    assert requeues.envelopes == [] and told == [[], [], []] and left == 0


def test_an_unreadable_message_on_a_queue_stops_any_requeue(make_settings, no_tasks):
    """If the message format is one this code cannot read, a missing request may be that message:
    nothing is enqueued twice, and the image TTL path stays the fallback."""
    settings, r = make_settings(), no_tasks
    r.set(settings.keys.blob("vanished"), b"image", ex=60)
    r.rpush(INFERENCE_QUEUE, b"not a celery message")
    requeues, bot = Requeues(), StubBot()
    told, left = rounds(settings, bot, [request("vanished")], [1.0, 2.0, 3.0], requeues)
    assert told == [[], [], []] and left == 1 and requeues.envelopes == []
    r.delete(INFERENCE_QUEUE)
    told, left = rounds(settings, bot, [request("vanished")], [1.0, 2.0], requeues)
    assert requeues.envelopes == [envelope("vanished")]  # readable again: the loss is seen
