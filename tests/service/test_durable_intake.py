"""Durable intake (bot.intake) with real Redis and a real python-telegram-bot Application polling the fake API.

The handler here only records what it saw; the whole bot, SIGKILLed mid-intake, is tested in
test_bot_kill.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from telegram import Update
from telegram.error import NetworkError
from telegram.ext import Application, TypeHandler

from bot.intake import GROUP, READER_TASK, DurableApplication, DurableUpdateQueue, Intake, run_reader, stop_task
from contract.keys import Keys

from .conftest import TOKEN

KEYS = Keys("xso:")


def build(fake, url: str, consumer: str, seen: Counter, **intake_options) -> tuple[Application, Intake]:
    intake = Intake(aioredis.Redis.from_url(url), KEYS, consumer=consumer, block_s=0.2, **intake_options)
    application = (
        Application.builder().application_class(DurableApplication).token(TOKEN)
        .base_url(f"{fake.url}/bot").base_file_url(f"{fake.url}/file/bot")
        .update_queue(DurableUpdateQueue(intake)).concurrent_updates(4).build()
    )

    async def record(update: Update, context) -> None:
        seen[update.update_id] += 1

    application.add_handler(TypeHandler(Update, record))
    return application, intake


async def run_for(application: Application, until, timeout: float = 20.0, poll: bool = True) -> None:
    """initialize, start the reader (and polling), run until ``until()`` is true, stop cleanly."""
    async with application:
        reader = application.bot_data[READER_TASK] = asyncio.create_task(run_reader(application))
        await application.start()
        if poll:
            await application.updater.start_polling(timeout=timedelta(seconds=1), poll_interval=0)
        try:
            async with asyncio.timeout(timeout):
                while not until():
                    await asyncio.sleep(0.05)
        finally:
            if poll:
                await application.updater.stop()
            await application.stop()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def test_every_update_is_processed_once_and_then_deleted(fake, redis_db, redis_client):
    seen: Counter = Counter()
    ids = [fake.inject_message(3000 + i, text=f"hello {i}")["message_id"] for i in range(10)]
    application, intake = build(fake, redis_db[0], "bot-a", seen)
    asyncio.run(run_for(application, lambda: len(seen) == len(ids)))
    assert sorted(seen.values()) == [1] * len(ids)
    assert fake.confirmed_offset > max(seen)  # Telegram was told, and forgot them
    assert redis_client.xlen(intake.stream) == 0  # acknowledged and deleted
    assert redis_client.xpending(intake.stream, GROUP)["pending"] == 0
    assert not list(redis_client.scan_iter("xso:update:*"))  # per-update notes deleted with the entry


def test_stopping_does_not_wait_for_updates_the_reader_feeds_after_the_stop_signal(fake, redis_db):
    """Application.stop queues a stop signal and drains its queue: the reader must be stopped first
    (else it feeds updates behind the signal, which are dropped, and keeps reading while the bot stops)."""
    seen: Counter = Counter()
    application, intake = build(fake, redis_db[0], "bot-stop", seen)

    async def keep_feeding() -> None:
        update_id = 50_000
        while True:
            update_id += 1
            await application.update_queue.feed(Update(update_id=update_id))
            await asyncio.sleep(0.002)

    async def scenario() -> None:
        async with application:
            await application.start()
            application.bot_data[READER_TASK] = asyncio.create_task(keep_feeding())
            while not seen:
                await asyncio.sleep(0.01)
            async with asyncio.timeout(10):
                await application.stop()
        await intake.redis.aclose()

    asyncio.run(scenario())
    assert seen and max(seen.values()) == 1
    assert READER_TASK not in application.bot_data


def test_storing_is_idempotent_by_update_id(fake, redis_db, redis_client):
    async def scenario() -> list[bool]:
        intake = Intake(aioredis.Redis.from_url(redis_db[0]), KEYS, consumer="bot-b")
        bot_update = Update.de_json({"update_id": 777, "message": {
            "message_id": 1, "date": 0, "chat": {"id": 5, "type": "private"}, "text": "hi"}}, None)
        try:
            return [await intake.store(bot_update), await intake.store(bot_update)]
        finally:
            await intake.redis.aclose()

    assert asyncio.run(scenario()) == [True, False]  # a batch fetched again after a crash is stored once
    assert redis_client.xlen("xso:intake") == 1
    assert 0 < redis_client.ttl("xso:intake") <= 24 * 3600  # every service key expires


def test_put_refuses_with_a_telegram_error_when_redis_is_down():
    async def scenario() -> None:
        intake = Intake(aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5), KEYS,
                        consumer="bot-c")
        update = Update.de_json({"update_id": 1, "message": {
            "message_id": 1, "date": 0, "chat": {"id": 5, "type": "private"}, "text": "hi"}}, None)
        # The Updater's retry loop treats a TelegramError as "try this batch again", without confirming it.
        with pytest.raises(NetworkError):
            await DurableUpdateQueue(intake).put(update)

    asyncio.run(scenario())


def leave_pending(fake, url: str, consumer: str, count: int, first_user: int) -> None:
    """A bot that stored and read ``count`` updates, confirmed them to Telegram, and died."""
    for i in range(count):
        fake.inject_message(first_user + i, text=f"lost? {i}")

    async def fetch_store_read() -> None:
        from telegram import Bot

        client = aioredis.Redis.from_url(url)
        intake = Intake(client, KEYS, consumer=consumer)
        async with Bot(TOKEN, base_url=f"{fake.url}/bot") as bot:
            updates = await bot.get_updates(timeout=1)
            for update in updates:
                await DurableUpdateQueue(intake).put(update)
            await bot.get_updates(offset=updates[-1].update_id + 1, timeout=0)  # confirmed: Telegram forgets
            await intake.ensure_group()
            reply = await client.xreadgroup(GROUP, consumer, {intake.stream: ">"}, count=count)
            assert len(reply[0][1]) == count  # read (pending), never acknowledged
        await client.aclose()

    asyncio.run(fetch_store_read())


def test_a_restarted_bot_finishes_what_its_previous_run_had_read(fake, redis_db, redis_client):
    leave_pending(fake, redis_db[0], "bot-d", 5, 3100)
    assert fake.confirmed_offset > 0 and not fake._get_updates({"offset": fake.confirmed_offset})
    seen: Counter = Counter()
    application, intake = build(fake, redis_db[0], "bot-d", seen)  # same consumer name: at once
    asyncio.run(run_for(application, lambda: len(seen) == 5, timeout=10))
    assert sorted(seen.values()) == [1] * 5
    assert redis_client.xlen(intake.stream) == 0


def test_another_bot_takes_over_entries_left_pending_too_long(fake, redis_db, redis_client):
    leave_pending(fake, redis_db[0], "bot-gone", 3, 3200)
    seen: Counter = Counter()
    application, intake = build(fake, redis_db[0], "bot-e", seen, claim_idle_s=1.0)
    asyncio.run(run_for(application, lambda: len(seen) == 3, timeout=15))
    assert sorted(seen.values()) == [1] * 3
    assert redis_client.xpending(intake.stream, GROUP)["pending"] == 0


def test_an_update_that_keeps_killing_the_bot_is_dropped(fake, redis_db, redis_client):
    leave_pending(fake, redis_db[0], "bot-f", 1, 3300)
    _, fields = redis_client.xrange("xso:intake")[0]
    redis_client.hset(f"xso:update:{int(fields[b'update_id'])}", "deliveries", 5)  # died five times with it
    seen: Counter = Counter()
    application, intake = build(fake, redis_db[0], "bot-f", seen, max_deliveries=5)

    async def scenario() -> None:
        async with application:
            await intake.ensure_group()
            await intake.recover_own(application.bot, application.update_queue.feed)

    asyncio.run(scenario())
    assert not seen and redis_client.xlen("xso:intake") == 0


def test_stopping_the_reader_asks_again_when_a_cancellation_is_lost():
    """A reader whose first cancellation is swallowed (as a library's read can) still ends on stop."""

    async def scenario() -> tuple[int, bool]:
        lost = 0

        async def reader() -> None:
            nonlocal lost
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if lost:
                        raise
                    lost += 1  # the first cancellation is lost; the loop reads on

        task = asyncio.get_running_loop().create_task(reader())
        await asyncio.sleep(0)
        await stop_task(task, within_s=5.0)
        return lost, task.cancelled()

    assert asyncio.run(scenario()) == (1, True)


def test_stopping_a_task_that_never_ends_gives_up_with_its_name_in_the_warning(caplog):
    """The bot's other Redis tasks (heartbeat, pending watchdog) are stopped the same way: a task that
    swallows every cancellation is left behind after ``within_s`` and the warning says which it was."""

    async def scenario() -> bool:
        released = asyncio.Event()

        async def stubborn() -> None:
            while not released.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)

        task = asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        await stop_task(task, within_s=0.5, name="the heartbeat task")
        given_up = not task.done()
        released.set()  # let it end now, so that nothing outlives the test's loop
        task.cancel()
        await task
        return given_up

    with caplog.at_level("WARNING", logger="bot.intake"):
        assert asyncio.run(scenario()) is True
    assert "the heartbeat task did not stop within" in caplog.text
