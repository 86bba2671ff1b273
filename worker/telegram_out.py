"""The only worker code that talks to Telegram (python-telegram-bot's ``Bot``, ``base_url`` from settings).

Celery tasks are synchronous; PTB is asyncio. Each worker process runs one event loop in a daemon
thread with one initialised ``Bot`` (its HTTP connection pool is reused), created lazily after the
fork. Each call runs the retry loop shared with the bot (``contract.telegram.retrying``: short 429s
waited out, 5xx and network errors retried with backoff, ``ATTEMPTS`` tries); what it gives up on is
sorted for the caller:

* ``telegram.error.RetryAfter`` (429) longer than ``MAX_INLINE_RETRY_AFTER_S``: ``Deferred(retry_after)``,
  so the task is retried with that countdown;
* 5xx / ``NetworkError`` / ``TimedOut`` after ``ATTEMPTS`` tries: ``Deferred`` with a longer backoff;
* ``Forbidden`` (bot blocked), ``BadRequest`` (chat gone…), ``InvalidToken``: ``Undeliverable``.

With a ``pacer`` (``contract.pacing``) every message first waits for its send slot, shared by all
delivery workers and the bot, so a burst stays under Telegram's limits instead of meeting 429s; a
slot further away than ``PACE_MAX_WAIT_S`` raises ``Deferred`` (the task is rescheduled), and a 429
that gets through anyway holds every sender to that chat for its ``retry_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError
from telegram import Bot, InputFile, InputMediaPhoto, LinkPreviewOptions, ReplyParameters
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.request import HTTPXRequest

from contract.pacing import Pacer, TooLong
from contract.settings import Settings
from contract.telegram import ATTEMPTS, backoff, quiet_http_logging, retry_after_seconds, retrying

logger = logging.getLogger(__name__)
quiet_http_logging()  # Bot API URLs contain the bot token

T = TypeVar("T")

CALL_TIMEOUT_S = 120.0  # per try


class Deferred(Exception):
    """Telegram asked us to wait, or is unreachable: retry the task after ``delay`` seconds."""

    def __init__(self, delay: float, reason: str):
        super().__init__(f"{reason}; retry in {delay:.1f}s")
        self.delay = delay
        self.reason = reason


class Undeliverable(Exception):
    """Telegram refused for good (bot blocked, chat not found, bad token…): retrying will not help."""


class TelegramOut:
    """Synchronous facade over an async ``Bot``; safe to create before a fork (everything is lazy)."""

    def __init__(self, settings: Settings, sleep: Callable[[float], None] = time.sleep, pacer: Pacer | None = None):
        self.settings = settings
        self._sleep = sleep
        self._pacer = pacer
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bot: Bot | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._pid != os.getpid() or self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="telegram-out", daemon=True)
                thread.start()
                self._loop, self._bot, self._pid = loop, None, os.getpid()
            return self._loop

    async def _get_bot(self) -> Bot:
        if self._bot is None:
            request = HTTPXRequest(connection_pool_size=8, connect_timeout=10, read_timeout=30, write_timeout=30,
                                   media_write_timeout=60)
            bot = Bot(
                token=self.settings.TELEGRAM_BOT_TOKEN.get_secret_value(),
                base_url=self.settings.api_base_url,
                base_file_url=self.settings.file_base_url,
                request=request,
            )
            await bot.initialize()  # one getMe per process: checks the token
            self._bot = bot
        return self._bot

    def _run(self, make_call: Callable[[Bot], Awaitable[T]]) -> T:
        loop = self._ensure_loop()

        async def call() -> T:
            return await make_call(await self._get_bot())

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return future.result(timeout=CALL_TIMEOUT_S * ATTEMPTS)  # every try of the retry loop
        except TimeoutError:
            future.cancel()  # not left running: a late send would answer twice
            raise

    def _wait_for_slot(self, what: str, chat_id: int) -> None:
        try:
            self._pacer.wait_turn(chat_id, self.settings.PACE_MAX_WAIT_S)
        except TooLong as too_long:
            raise Deferred(too_long.wait_s, f"{what}: waiting for a send slot") from None
        except RedisError as error:  # no shared pace without Redis: send, Telegram's 429s still apply
            logger.warning("%s: send pacing unavailable (%s)", what, type(error).__name__)

    def call(self, what: str, make_call: Callable[[Bot], Awaitable[T]], chat_id: int | None = None) -> T:
        """Run one Bot API call through the shared retry loop and sort what it gives up on (module
        docstring); a message to ``chat_id`` waits for its send slot first (``None``: not a message,
        not paced). The pacer and the sleeps are synchronous: they run off the event loop."""
        paced = self._pacer is not None and chat_id is not None

        async def before() -> None:
            await asyncio.to_thread(self._wait_for_slot, what, chat_id)

        async def on_flood(wait: float) -> None:
            await asyncio.to_thread(self._pacer.penalise, chat_id, wait)

        async def sleep(seconds: float) -> None:
            await asyncio.to_thread(self._sleep, seconds)

        try:
            return self._run(lambda bot: retrying(lambda: make_call(bot), what, "worker", sleep=sleep,
                                                  before=before if paced else None,
                                                  on_flood=on_flood if paced else None))
        except RetryAfter as error:
            raise Deferred(retry_after_seconds(error), f"{what}: flood control") from None
        except (Forbidden, InvalidToken, ChatMigrated, BadRequest) as error:
            # BadRequest subclasses NetworkError: handled here, before the transient branch.
            raise Undeliverable(f"{what}: {type(error).__name__}: {error.message}") from None
        except (NetworkError, TimeoutError, OSError) as error:
            raise Deferred(backoff(ATTEMPTS + 2), f"{what}: {type(error).__name__}") from None
        except TelegramError as error:
            raise Undeliverable(f"{what}: {type(error).__name__}: {error.message}") from None

    # ------------------------------------------------------------------ API used by the tasks
    @staticmethod
    def _reply_to(message_id: int | None) -> ReplyParameters | None:
        if message_id is None:
            return None
        return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)

    def send_text(self, chat_id: int, text: str, reply_to: int | None = None) -> int:
        message = self.call("sendMessage", lambda bot: bot.send_message(
            chat_id=chat_id,
            text=text,
            reply_parameters=self._reply_to(reply_to),
            link_preview_options=LinkPreviewOptions(is_disabled=True),
        ), chat_id=chat_id)
        return message.message_id

    def send_photo(self, chat_id: int, image: bytes, caption: str | None = None, reply_to: int | None = None) -> int:
        message = self.call("sendPhoto", lambda bot: bot.send_photo(
            chat_id=chat_id,
            photo=InputFile(image, filename="heatmap.jpg"),
            caption=caption,
            reply_parameters=self._reply_to(reply_to),
        ), chat_id=chat_id)
        return message.message_id

    def send_media_group(self, chat_id: int, photos: list[tuple[bytes, str | None]],
                         reply_to: int | None = None) -> list[int]:
        """An album (2–10 photos, each with its own caption) in one call: accepted or refused as a whole."""
        media = [InputMediaPhoto(media=image, filename=f"heatmap{index}.jpg", caption=caption)
                 for index, (image, caption) in enumerate(photos)]
        messages = self.call("sendMediaGroup", lambda bot: bot.send_media_group(
            chat_id=chat_id,
            media=media,
            reply_parameters=self._reply_to(reply_to),
        ), chat_id=chat_id)
        return [message.message_id for message in messages]

    def send_document(self, chat_id: int, data: bytes, filename: str, caption: str | None = None,
                      reply_to: int | None = None) -> int:
        message = self.call("sendDocument", lambda bot: bot.send_document(
            chat_id=chat_id,
            document=InputFile(data, filename=filename),
            caption=caption,
            reply_parameters=self._reply_to(reply_to),
        ), chat_id=chat_id)
        return message.message_id

    def delete_message(self, chat_id: int, message_id: int) -> bool:
        """Best effort (the acknowledgement may be gone already): never raises."""
        try:
            return bool(self.call("deleteMessage", lambda bot: bot.delete_message(chat_id=chat_id,
                                                                               message_id=message_id)))
        except (Deferred, Undeliverable) as error:
            logger.info("deleteMessage skipped: %s", error)
            return False

    def close(self) -> None:
        loop, bot = self._loop, self._bot
        if loop is None or self._pid != os.getpid():
            return
        if bot is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(bot.shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._loop = self._bot = None
