"""The shared Telegram send pacing (worker.pacing) against a real Redis: limits hold across senders."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio as aioredis

from contract.pacing import AsyncPacer, Limits, Pacer, Rate, TooLong


def most_in_window(times: list[float], window: float) -> int:
    """The largest number of events that fall within any ``window`` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_overall_rate_holds_for_many_chats(redis_client):
    pacer = Pacer(redis_client)
    started = time.monotonic()
    replies = [pacer.try_reserve(chat_id=5000 + i, max_wait_s=60) for i in range(60)]
    assert all(reserved for reserved, _ in replies)
    slots = [started + wait for _, wait in replies]
    # 20/s, one at a time: never more than 21 in one second, 60 messages take ~3 s.
    assert most_in_window(slots, 1.0) <= 21
    assert 2.8 <= slots[-1] - started <= 3.3
    assert slots == sorted(slots)


def test_one_chat_gets_a_pair_then_one_per_second(redis_client):
    pacer = Pacer(redis_client)
    assert pacer.try_reserve(chat_id=42, max_wait_s=60)[0]
    assert pacer.try_reserve(chat_id=42, max_wait_s=60)[0]  # a reply's text and photo go together
    reserved, wait = pacer.try_reserve(chat_id=42, max_wait_s=60)
    assert not reserved and wait == pytest.approx(1.0, abs=0.1)  # busy: ask again in a second
    assert pacer.try_reserve(chat_id=43, max_wait_s=60) == (True, pytest.approx(0, abs=0.1))  # not held up
    started = time.monotonic()
    pacer.wait_turn(chat_id=42, max_wait_s=5)
    assert time.monotonic() - started == pytest.approx(1.0, abs=0.2)


def test_groups_get_twenty_a_minute(redis_client):
    pacer = Pacer(redis_client)
    assert pacer.try_reserve(chat_id=-1001, max_wait_s=60)[0]
    assert pacer.try_reserve(chat_id=-1001, max_wait_s=60) == (False, pytest.approx(60 / 19, abs=0.1))


def test_a_wait_longer_than_accepted_reserves_nothing(redis_client):
    pacer = Pacer(redis_client)
    pacer.wait_turn(chat_id=-1002, max_wait_s=60)
    started = time.monotonic()
    with pytest.raises(TooLong) as too_long:
        pacer.wait_turn(chat_id=-1002, max_wait_s=1.0)
    assert too_long.value.wait_s == pytest.approx(60 / 19, abs=0.1)
    assert time.monotonic() - started < 0.5  # refused at once, without sleeping
    # Refusing did not push the slot further away.
    assert pacer.try_reserve(chat_id=-1002, max_wait_s=60) == (False, pytest.approx(60 / 19, abs=0.1))


def test_retry_after_holds_every_sender(redis_client):
    pacer, other = Pacer(redis_client), Pacer(redis.Redis(connection_pool=redis_client.connection_pool))
    pacer.penalise(chat_id=77, retry_after_s=3)
    assert other.try_reserve(chat_id=77, max_wait_s=60) == (False, pytest.approx(3.0, abs=0.1))
    assert other.try_reserve(chat_id=78, max_wait_s=60) == (True, pytest.approx(0, abs=0.1))
    pacer.penalise(chat_id=None, retry_after_s=2)  # a global flood wait holds every chat
    assert other.try_reserve(chat_id=79, max_wait_s=60) == (True, pytest.approx(2.0, abs=0.1))


def test_four_senders_sleeping_for_their_slots_stay_under_the_limit(redis_db, redis_client):
    url, _ = redis_db
    sent: list[float] = []
    lock = threading.Lock()
    limits = Limits(overall=Rate(20.0, 2))

    def sender(offset: int) -> None:
        pacer = Pacer(redis.Redis.from_url(url), limits=limits)
        for i in range(15):
            pacer.wait_turn(chat_id=offset * 100 + i, max_wait_s=30)
            with lock:
                sent.append(time.monotonic())

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(sent) == 60
    assert most_in_window(sent, 1.0) <= 22 + 1  # 20/s + burst 2, one more for scheduling jitter
    assert time.monotonic() - started >= (60 - 2) / 20 - 0.2


def test_async_pacer_shares_the_buckets(redis_db, redis_client):
    url, _ = redis_db
    sync = Pacer(redis_client)
    sync.wait_turn(chat_id=91, max_wait_s=60)
    sync.wait_turn(chat_id=91, max_wait_s=60)

    async def reserve() -> tuple[bool, float]:
        client = aioredis.Redis.from_url(url)
        try:
            return await AsyncPacer(client).try_reserve(chat_id=91, max_wait_s=60)
        finally:
            await client.aclose()

    assert asyncio.run(reserve()) == (False, pytest.approx(1.0, abs=0.1))


def test_the_fake_api_refuses_an_unpaced_burst_and_accepts_a_paced_one(fake, redis_client):
    import httpx

    from .conftest import TOKEN

    with httpx.Client(base_url=f"{fake.url}/bot{TOKEN}") as client:

        def send(chat_id: int) -> int:
            return client.post("/sendMessage", data={"chat_id": chat_id, "text": "hi"}).status_code

        fake.enforce_limits()
        unpaced = [send(6000 + i // 4) for i in range(60)]  # 15 chats, 4 messages each, as fast as possible
        assert unpaced.count(429) == fake.limit_refusals >= 15  # at least the 4th message to each chat

        fake.enforce_limits()  # fresh windows and counters
        pacer = Pacer(redis_client)
        paced = []
        for i in range(60):  # the same 60 messages, round robin over the chats
            pacer.wait_turn(chat_id=7000 + i % 15, max_wait_s=10)
            paced.append(send(7000 + i % 15))
        assert paced.count(200) == 60 and fake.limit_refusals == 0


def test_the_bots_own_messages_take_a_busy_chats_next_slot_first(redis_db, redis_client):
    worker, bot = Pacer(redis_client), Pacer(redis.Redis.from_url(redis_db[0]), priority=True)
    assert worker.try_reserve(chat_id=95, max_wait_s=60)[0] and worker.try_reserve(chat_id=95, max_wait_s=60)[0]
    reserved, wait = bot.try_reserve(chat_id=95, max_wait_s=60)  # busy: the bot marks the next slot wanted
    assert not reserved and wait == pytest.approx(1.0, abs=0.1)
    time.sleep(wait)
    assert worker.try_reserve(chat_id=95, max_wait_s=60)[0] is False  # free, but left to the bot
    assert bot.try_reserve(chat_id=95, max_wait_s=60)[0]  # the bot's acknowledgement goes first
    assert not redis_client.exists("xso:pace:wanted:95")
    assert worker.try_reserve(chat_id=96, max_wait_s=60)[0]  # other chats are not held up
