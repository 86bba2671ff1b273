"""One acknowledgement per burst of images, sent and edited at the chat's pace, never dropped.

``contract.bursts`` keeps the state in Redis (which burst an image joined, how many images it
covers, its message id, its unanswered requests); this module sends the message. Per burst one
*flusher* task of this process sends "Received, analysing…" (to the burst's first image) and then
edits it whenever more images have joined, each call waiting for the chat's next send slot
(``contract.pacing``; an edit counts like a message). Images that join while a send or an edit is
waiting are covered by the next edit: twelve images in three seconds cost about four calls, not
twelve, and none is refused by our own pace. The intake handler never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from functools import partial
from typing import Any

from telegram import Bot, ReplyParameters
from telegram.error import BadRequest, RetryAfter, TelegramError

from contract import texts
from contract.bursts import JOIN_LUA, LEAVE_LUA, SET_MESSAGE_LUA
from contract.keys import Keys
from contract.telegram import PACE_BUDGET_S, backoff, retry_after_seconds

logger = logging.getLogger(__name__)

# How long one send or edit of an acknowledgement may wait for the chat's send slot: long, since
# nothing waits for it (answers and notices of the same chat take slots too).
ACK_PACE_BUDGET_S = 60.0
FLUSH_MAX_S = 300.0  # a flusher that cannot get its message through gives up after this (logged)
ATTEMPTS = 5  # network errors per call before the flusher gives up
REMEMBERED_BURSTS = 10_000  # message ids of sent acknowledgements kept in memory (a Redis restart forgets them)


class BurstAcks:
    def __init__(self, redis_client: Any, keys: Keys, merge_s: float, ttl_s: int):
        self.redis = redis_client
        self.keys = keys
        self.merge_s = merge_s
        self.ttl_s = ttl_s
        self._join = redis_client.register_script(JOIN_LUA)
        self._leave = redis_client.register_script(LEAVE_LUA)
        self._set_message = redis_client.register_script(SET_MESSAGE_LUA)
        self._flushers: dict[str, asyncio.Task] = {}
        self._wanted: set[str] = set()  # bursts joined since their flusher last read the count
        # burst → (message id of the acknowledgement this process sent, Redis' run id then): what the
        # watchdog edits or deletes when a Redis restart has wiped the burst's state (``bot.pending``).
        self._sent: OrderedDict[str, tuple[int, str | None]] = OrderedDict()

    async def join(self, chat_id: int, request_id: str) -> tuple[str, int, bool]:
        """The burst this request belongs to: (burst id, images it covers, True if this opened it)."""
        burst, count, opened = await self._join(
            keys=[self.keys.ack_burst(chat_id), self.keys.ack_of(request_id)],
            args=[self.keys.prefix, secrets.token_urlsafe(9), request_id, chat_id, int(self.merge_s * 1000),
                  self.ttl_s])
        return (burst.decode() if isinstance(burst, bytes) else str(burst)), int(count), bool(int(opened))

    async def leave(self, request_id: str) -> int:
        """The request is answered or given up (``contract.bursts.LEAVE_LUA`` codes)."""
        return int(await self._leave(keys=[self.keys.ack_of(request_id)], args=[self.keys.prefix, request_id]))

    def sent_message(self, burst: str | None) -> int | None:
        """The acknowledgement this process sent for ``burst``, from memory (survives a Redis restart)."""
        remembered = self._sent.get(burst) if burst else None
        return remembered[0] if remembered else None

    def forget(self, burst: str | None) -> None:
        if burst:
            self._sent.pop(burst, None)

    async def orphaned(self, bursts: set[str]) -> dict[str, int]:
        """Acknowledgements this process sent for ``bursts`` before Redis restarted: {burst: message id}.

        A restart wipes a burst's state, so the answers delivered after it cannot find its message to
        delete: the bot, which remembers it, deletes it once the burst's requests are all answered."""
        remembered = {burst: self._sent[burst] for burst in bursts if burst in self._sent}
        if not remembered:
            return {}
        run = await self._run_id()
        if run is None:
            return {}
        return {burst: message for burst, (message, sent_in) in remembered.items() if sent_in not in (None, run)}

    async def _run_id(self) -> str | None:
        """Redis' run id: it changes when the server restarts (and its in-memory keys are gone)."""
        try:
            return str((await self.redis.info("server"))["run_id"])
        except Exception:  # INFO disabled or Redis down: no restart can be told, nothing is deleted
            return None

    def _remember(self, burst: str, message_id: int, run: str | None) -> None:
        self._sent[burst] = (message_id, run)
        self._sent.move_to_end(burst)
        while len(self._sent) > REMEMBERED_BURSTS:
            self._sent.popitem(last=False)

    async def message_id(self, burst: str) -> int | None:
        raw = await self.redis.hget(self.keys.ack(burst), "message")
        return int(raw) if raw else None

    def acknowledge(self, bot: Bot, chat_id: int, burst: str, opened: bool, reply_to: int, language: str,
                    waiting: int) -> None:
        """Make sure the burst's message shows every image that joined it (in the background)."""
        self._wanted.add(burst)
        if burst in self._flushers:
            return
        task = asyncio.get_running_loop().create_task(
            self._flush(bot, chat_id, burst, opened, reply_to, language, waiting), name=f"ack-{burst}")
        self._flushers[burst] = task

    async def close(self) -> None:
        tasks = list(self._flushers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _state(self, burst: str) -> tuple[int | None, int] | None:
        """(message id, images covered), None when the burst was closed (all answered)."""
        message, count = await self.redis.hmget(self.keys.ack(burst), ["message", "count"])
        if count is None:
            return None
        return (int(message) if message else None), int(count)

    async def _call(self, make_call: Any, deadline: float) -> Any:
        """One send or edit at the chat's pace; a 429 or a network error is waited out and tried again
        (until ``deadline``, the loop's clock)."""
        loop = asyncio.get_running_loop()
        failures = 0
        budget = PACE_BUDGET_S.set(ACK_PACE_BUDGET_S)
        try:
            while True:
                try:
                    return await make_call()
                except RetryAfter as error:  # the slot was further away than the budget, or Telegram said so
                    wait = retry_after_seconds(error)
                    if loop.time() + wait > deadline:
                        raise
                    await asyncio.sleep(wait)
                except BadRequest:
                    raise
                except TelegramError as error:
                    failures += 1
                    if failures >= ATTEMPTS:
                        raise
                    logger.info("acknowledgement: %s, trying again", type(error).__name__)
                    await asyncio.sleep(backoff(failures - 1))
        finally:
            PACE_BUDGET_S.reset(budget)

    async def _flush(self, bot: Bot, chat_id: int, burst: str, opened: bool, reply_to: int, language: str,
                     waiting: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_MAX_S
        shown = 0
        run = await self._run_id()
        try:
            while True:
                self._wanted.discard(burst)
                state = await self._state(burst)
                if state is None:
                    return  # every image of the burst is answered: nothing to acknowledge any more
                message, count = state
                if message is None and not opened:
                    # Another run (or bot) opened the burst and is sending its message: wait for it.
                    if loop.time() > deadline:
                        logger.warning("acknowledgement of a burst was never sent by the bot that opened it")
                        return
                    await asyncio.sleep(0.2)
                    self._wanted.add(burst)
                    continue
                text = texts.received(language, waiting, count)
                if message is None:
                    sent = await self._call(partial(
                        bot.send_message, chat_id, text,
                        reply_parameters=ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)),
                        deadline)
                    if not await self._set_message(keys=[self.keys.ack(burst)], args=[sent.message_id]):
                        # All answered while it was on its way: the answers stand, the acknowledgement goes.
                        await self._call(partial(bot.delete_message, chat_id, sent.message_id), deadline)
                        return
                    self._remember(burst, sent.message_id, run)
                    shown = count
                elif count > shown:
                    await self._call(partial(bot.edit_message_text, text, chat_id=chat_id, message_id=message),
                                     deadline)
                    shown = count
                if burst not in self._wanted:
                    return  # no image joined since the count was read (no await between here and the exit)
        except BadRequest as error:  # the message is gone: the answers replaced it
            logger.info("acknowledgement not updated: %s", error.message)
        except TelegramError as error:
            logger.warning("acknowledgement failed: %s", type(error).__name__)
        finally:
            if self._flushers.get(burst) is asyncio.current_task():
                del self._flushers[burst]
