"""Durable intake: each Telegram update is stored in Redis before Telegram is told it was received.

python-telegram-bot hands every update it receives to ``application.update_queue.put(update)``:
the polling ``Updater`` does so for a whole ``getUpdates`` batch *before* it asks for the next
batch with a higher offset (which tells Telegram to forget the previous one), and the webhook
handler does so *before* it answers Telegram's POST with 200. Whatever is only in memory at that
point is lost when the bot dies. Here the queue's ``put`` appends the update to a Redis stream
instead (``XADD``, once per ``update_id``: a batch fetched again after a crash is not stored
twice) and returns only when Redis has it; if Redis cannot take it, ``put`` raises a
``NetworkError``, so the Updater asks for the same batch again later and the webhook answers 500
(Telegram retries).

The bot reads the stream through a consumer group (``XREADGROUP``) and feeds the application's
in-memory queue; once the application has processed an update (handlers done, errors reported)
the entry is acknowledged and deleted (``XACK`` + ``XDEL``). A restarted bot first finishes the
entries its previous life had read but not acknowledged (its own pending list, same consumer
name), and every bot regularly takes over entries another consumer left pending for longer than
``claim_idle_s`` (``XAUTOCLAIM``; a pod that was replaced under another name). An update whose
processing killed the bot ``max_deliveries`` times is dropped with an error in the log.

Handlers see an update at least once. ``progress``/``note`` keep per-update notes (e.g. the
request id and acknowledgement of an image) so that a handler run again after a crash resumes
instead of answering twice; the notes are deleted with the stream entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

from redis.exceptions import RedisError, ResponseError
from telegram import Bot, Update
from telegram.error import NetworkError
from telegram.ext import Application

from contract.keys import Keys

logger = logging.getLogger(__name__)

GROUP = "bot"

# Once per update id: the "seen" mark and the stream entry are written together or not at all.
# The stream expires like the marks (every service key has a TTL): it only goes when no update at
# all arrived for that long, and Telegram would not send an older one again either.
_STORE_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  local entry = redis.call('XADD', KEYS[2], '*', 'update_id', ARGV[2], 'update', ARGV[3])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
  return entry
end
return false
"""


def default_consumer() -> str:
    """The host name: a bot restarted in the same container or pod finds its own pending entries."""
    return socket.gethostname()


class Intake:
    """The Redis side: store, read (consumer group), acknowledge, reclaim, per-update notes."""

    def __init__(self, redis_client: Any, keys: Keys, *, consumer: str | None = None,
                 claim_idle_s: float = 60.0, seen_ttl_s: int = 24 * 3600, max_deliveries: int = 5,
                 max_in_flight: int = 64, block_s: float = 1.0):
        self.redis = redis_client
        self.keys = keys
        self.stream = keys.intake_stream()
        self.consumer = consumer or default_consumer()
        self.claim_idle_s = claim_idle_s
        self.seen_ttl_s = seen_ttl_s  # Telegram keeps an unconfirmed update for up to 24 h
        self.max_deliveries = max_deliveries
        self.max_in_flight = max_in_flight
        self.block_s = block_s
        self._store = redis_client.register_script(_STORE_LUA)
        self._in_flight: dict[int, str] = {}  # update_id → stream entry id, read and not yet acknowledged

    def seen_key(self, update_id: int) -> str:
        return self.keys.intake_seen(update_id)

    def notes_key(self, update_id: int) -> str:
        return self.keys.update_notes(update_id)

    # ------------------------------------------------------------------ store (the queue's put)
    async def store(self, update: Update) -> bool:
        """Append the update to the stream; False when it was stored before (fetched again)."""
        data = json.dumps(update.to_dict(), separators=(",", ":"))
        entry = await self._store(keys=[self.seen_key(update.update_id), self.stream],
                                  args=[self.seen_ttl_s, update.update_id, data])
        return entry is not None

    # ------------------------------------------------------------------ read
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            await self.redis.expire(self.stream, self.seen_ttl_s)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _take(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]], bot: Bot,
                    feed: Any) -> int:
        """Hand entries to ``feed`` (skipping those in flight here); returns how many were fed."""
        fed = 0
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if not fields:  # deleted meanwhile: nothing left to do
                await self.redis.xack(self.stream, GROUP, entry_id)
                continue
            update_id = int(fields[b"update_id"])
            if update_id in self._in_flight:
                continue
            attempts = int(await self.redis.hincrby(self.notes_key(update_id), "deliveries", 1))
            await self.redis.expire(self.notes_key(update_id), self.seen_ttl_s)
            if attempts > self.max_deliveries:
                logger.error("update %d: dropped after %d deliveries (its processing keeps failing)", update_id,
                             attempts - 1)
                await self._ack(update_id, entry_id)
                continue
            try:
                update = Update.de_json(json.loads(fields[b"update"]), bot)
            except Exception:
                logger.exception("update %d: unreadable entry, dropped", update_id)
                await self._ack(update_id, entry_id)
                continue
            if attempts > 1:
                logger.info("update %d: taken over (delivery %d)", update_id, attempts)
            self._in_flight[update_id] = entry_id
            await feed(update)
            fed += 1
        return fed

    async def recover_own(self, bot: Bot, feed: Any) -> int:
        """Entries this consumer name had read in a previous life and never acknowledged."""
        fed, last = 0, "0"
        while True:
            reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: last}, count=100)
            entries = reply[0][1] if reply else []
            if not entries:
                return fed
            fed += await self._take(entries, bot, feed)
            last = entries[-1][0].decode()

    async def claim_abandoned(self, bot: Bot, feed: Any) -> int:
        """Entries pending with any consumer for longer than ``claim_idle_s`` (their bot died)."""
        fed, start = 0, "0-0"
        while True:
            reply = await self.redis.xautoclaim(self.stream, GROUP, self.consumer,
                                                min_idle_time=int(self.claim_idle_s * 1000), start_id=start, count=100)
            start, entries = reply[0], reply[1]
            start = start.decode() if isinstance(start, bytes) else start
            fed += await self._take(entries, bot, feed)
            if start == "0-0":
                return fed

    async def read_new(self, bot: Bot, feed: Any) -> int:
        room = self.max_in_flight - len(self._in_flight)
        if room <= 0:
            await asyncio.sleep(0.05)
            return 0
        reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=room,
                                            block=int(self.block_s * 1000))
        return await self._take(reply[0][1] if reply else [], bot, feed)

    async def run(self, bot: Bot, feed: Any, claim_every_s: float = 5.0) -> None:
        """The reader loop (a task of the bot's event loop): own leftovers, then new and abandoned entries."""
        while True:
            try:
                await self.ensure_group()
                recovered = await self.recover_own(bot, feed)
                if recovered:
                    logger.warning("intake: finishing %d update(s) a previous run had taken", recovered)
                break
            except RedisError as error:
                logger.warning("intake: Redis unavailable (%s); retrying", type(error).__name__)
                await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        next_claim = loop.time()
        while True:
            try:
                if loop.time() >= next_claim:
                    claimed = await self.claim_abandoned(bot, feed)
                    if claimed:
                        logger.warning("intake: took over %d update(s) left by another bot", claimed)
                    next_claim = loop.time() + claim_every_s
                await self.read_new(bot, feed)
            except RedisError as error:
                logger.warning("intake: Redis unavailable (%s); retrying", type(error).__name__)
                await asyncio.sleep(1.0)
                with contextlib.suppress(RedisError):
                    await self.ensure_group()  # an empty Redis after a restart has no group

    # ------------------------------------------------------------------ acknowledge
    async def _ack(self, update_id: int, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.delete(self.notes_key(update_id))
            await pipe.execute()

    async def done(self, update_id: int) -> None:
        """The update was processed: acknowledge and delete its entry and notes."""
        entry_id = self._in_flight.get(update_id)
        if entry_id is None:
            return
        try:
            await self._ack(update_id, entry_id)
        except RedisError as error:  # left pending: processed again later, idempotently
            logger.warning("update %d: acknowledgement failed (%s)", update_id, type(error).__name__)
        finally:
            self._in_flight.pop(update_id, None)

    def release(self, update_id: int) -> None:
        """Not processed (shutdown): forget it here; it stays pending for the next run."""
        self._in_flight.pop(update_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # ------------------------------------------------------------------ per-update notes
    async def progress(self, update_id: int) -> dict[str, str]:
        """What an earlier run of this update's handler noted (empty the first time)."""
        raw = await self.redis.hgetall(self.notes_key(update_id))
        return {key.decode(): value.decode() for key, value in raw.items()}

    async def note(self, update_id: int, **fields: str | int) -> None:
        await self.redis.hset(self.notes_key(update_id), mapping={k: str(v) for k, v in fields.items()})
        await self.redis.expire(self.notes_key(update_id), self.seen_ttl_s)


class DurableUpdateQueue(asyncio.Queue):
    """``ApplicationBuilder.update_queue``: ``put(update)`` stores in Redis; the reader fills the queue."""

    def __init__(self, intake: Intake):
        super().__init__()
        self.intake = intake

    async def put(self, item: Any) -> None:
        if not isinstance(item, Update):  # the application's own stop signal and the like
            await super().put(item)
            return
        try:
            await self.intake.store(item)
        except RedisError as error:
            # A TelegramError: the Updater's retry loop fetches the same batch again later (the
            # offset is not advanced); the webhook answers 500 and Telegram retries.
            raise NetworkError(f"could not store update {item.update_id}: {type(error).__name__}") from None

    async def feed(self, update: Update) -> None:
        """Called by the reader: hand a stored update to the application."""
        await super().put(update)


READER_TASK = "intake"  # ``bot_data`` key of the reader task (started by the bot's ``post_init``)


async def stop_task(task: asyncio.Task, within_s: float = 10.0, name: str = "the intake reader") -> None:
    """Cancel ``task`` and wait for it to end, asking again every 0.2 s: one cancellation can be lost
    inside a library's read (seen once in CI: the reader still in XREADGROUP 20 s after one cancel,
    the cause not found). Gives up after ``within_s`` with a warning rather than hang the bot's stop."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
        if asyncio.get_running_loop().time() > deadline:
            logger.warning("%s did not stop within %.0f s; stopping without it", name, within_s)
            return
    if not task.cancelled() and task.exception() is not None:
        logger.warning("%s ended with %r", name, task.exception())


class DurableApplication(Application):
    """An ``Application`` that acknowledges each stored update once it has processed it."""

    async def stop(self) -> None:
        """Stop the reader first: ``Application.stop`` queues its stop signal and drains the queue, so
        updates the reader fed behind that signal were dropped from memory (left pending, handled
        only by the next run) while the reader kept reading until ``post_stop``. Entries not fed stay
        pending in the stream for the next run."""
        reader = self.bot_data.pop(READER_TASK, None)
        if reader is not None:
            await stop_task(reader)
        await super().stop()

    async def process_update(self, update: object) -> None:
        queue = self.update_queue
        if not isinstance(update, Update) or not isinstance(queue, DurableUpdateQueue):
            await super().process_update(update)
            return
        try:
            await super().process_update(update)
        except asyncio.CancelledError:
            queue.intake.release(update.update_id)
            raise
        except Exception:
            logger.exception("update %d: processing failed", update.update_id)
        await queue.intake.done(update.update_id)


async def run_reader(application: Application) -> None:
    """Start this as a task once the application is initialised (``post_init``)."""
    queue = application.update_queue
    if not isinstance(queue, DurableUpdateQueue):
        raise TypeError("the application was not built with a DurableUpdateQueue")
    await queue.intake.run(application.bot, queue.feed)
