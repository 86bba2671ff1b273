"""The bot's watchdog for accepted requests that were lost (bot/pending.py), against a real Redis.

End to end it runs in test_redis_restart.py; here each rule on its own, with a stub Bot API.
"""

from __future__ import annotations

import asyncio

from telegram.error import BadRequest

from bot.pending import PendingRequest, PendingRequests
from bot.store import Store
from contract.envelope import RequestEnvelope
from contract.texts import lost as lost_text
from worker.deliver import send_reply

CHAT = 1801


class StubBot:
    def __init__(self, deleted: set[int] = frozenset()):
        self.deleted = set(deleted)
        self.edits: list[tuple[int, str]] = []
        self.sent: list[tuple[int, str]] = []

    async def edit_message_text(self, text, chat_id, message_id):
        if message_id in self.deleted:
            raise BadRequest("Message to edit not found")
        self.edits.append((message_id, text))

    async def send_message(self, chat_id, text, reply_parameters=None):
        self.sent.append((reply_parameters.message_id, text))


def envelope(request_id: str, ack: int | None = 500, chat_id: int = CHAT, language: str = "ru") -> RequestEnvelope:
    return RequestEnvelope(request_id=request_id, blob_key=f"xso:blob:{request_id}", chat_id=chat_id,
                           reply_to_message_id=7, ack_message_id=ack, language=language)


def request(request_id: str, ack: int | None = 500) -> PendingRequest:
    return PendingRequest(envelope=envelope(request_id, ack), user_id=CHAT, accepted_at=0.0)


def rounds(settings, bot: StubBot, requests: list[PendingRequest], times: list[float]):
    """Run watchdog rounds at the given (monotonic) times; returns (ids told per round, pending left)."""

    async def main():
        store = Store(settings)
        pending = PendingRequests(settings, store)
        for item in requests:
            pending.add(item)
        told = [await pending.check(bot, now=now) for now in times]
        await store.close()
        return told, len(pending)

    return asyncio.run(main())


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
