"""One Telegram retry loop for the bot and the workers (``retrying``), and the bot's retrying HTTP layer.

The policy: a 429 whose ``retry_after`` is at most ``MAX_INLINE_RETRY_AFTER_S`` is waited out in
place; 5xx and network errors are retried with exponential backoff and jitter (``backoff``); at most
``ATTEMPTS`` tries per call; anything longer or permanent goes to the caller as python-telegram-bot
raised it. The bot runs it in ``RetryingRequest`` (python-telegram-bot's HTTP layer: without it one
"Too Many Requests" or "Bad Gateway" would lose an acknowledgement, a command's answer or a download);
the delivery worker in ``worker.telegram_out.TelegramOut.call``, which turns what is left into a
Celery retry countdown. URLs are never logged: they contain the bot token.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import random
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from telegram.error import BadRequest, NetworkError, RetryAfter
from telegram.request import HTTPXRequest, RequestData

from .monitoring import TELEGRAM_429

# Opt in to PTB 23 behaviour now (time periods as timedelta, e.g. RetryAfter.retry_after; read at
# run time): no deprecation warnings per 429, and ``retry_after_seconds`` reads both forms anyway.
os.environ.setdefault("PTB_TIMEDELTA", "true")

logger = logging.getLogger(__name__)

ATTEMPTS = 3  # tries per Bot API call for 5xx / network errors
MAX_INLINE_RETRY_AFTER_S = 5.0  # a 429 asking for longer is handed to the caller
BACKOFF_BASE_S = 0.5


def backoff(attempt: int, base: float = BACKOFF_BASE_S, cap: float = 60.0) -> float:
    """Exponential backoff with jitter (attempt 0 → up to ``base`` seconds); not security-relevant randomness."""
    return min(cap, base * (2 ** attempt)) * (0.5 + random.random() / 2)  # nosec B311


def retry_after_seconds(error: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 deprecates the int form; accept both
        warnings.simplefilter("ignore", DeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


T = TypeVar("T")


async def retrying(send: Callable[[], Awaitable[T]], what: str, sender: str, *, attempts: int = ATTEMPTS,
                   max_inline_wait_s: float = MAX_INLINE_RETRY_AFTER_S,
                   sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                   before: Callable[[], Awaitable[Any]] | None = None,
                   on_flood: Callable[[float], Awaitable[Any]] | None = None) -> T:
    """The one retry loop: ``send()`` (one Bot API call) at most ``attempts`` times. A 429
    (``RetryAfter``) is counted for ``sender`` (``bot`` or ``worker``), told to ``on_flood`` (the pacer
    holds the chat) and waited out when ``retry_after`` ≤ ``max_inline_wait_s``; a network error or 5xx
    (``NetworkError``, ``TimedOut``, not ``BadRequest``) waits ``backoff``; whatever is left, a longer
    429 and anything permanent (``Forbidden``, ``BadRequest``, ``InvalidToken``…) is raised unchanged.
    ``before()`` runs before every try (the send slot; what it raises goes to the caller)."""
    attempt = 0
    while True:
        if before is not None:
            await before()
        attempt += 1
        try:
            return await send()
        except RetryAfter as error:
            TELEGRAM_429.labels(sender).inc()
            wait = retry_after_seconds(error)
            if on_flood is not None:
                with contextlib.suppress(Exception):  # every sender honours Telegram's retry_after
                    await on_flood(wait)
            if wait > max_inline_wait_s or attempt >= attempts:
                raise
            wait += 0.1
            logger.info("%s: 429, waiting %.1fs as told", what, wait)
        except NetworkError as error:
            if isinstance(error, BadRequest) or attempt >= attempts:  # BadRequest subclasses NetworkError
                raise
            wait = backoff(attempt - 1)
            logger.info("%s: %s, retrying in %.1fs", what, type(error).__name__, wait)
        await sleep(wait)


def quiet_http_logging() -> None:
    """httpx logs every request URL at INFO, and Bot API URLs contain the bot token; so does
    python-telegram-bot's Bot at DEBUG ("Set Bot API URL: …/bot<token>")."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    quiet = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("telegram.Bot", "telegram.ext.ExtBot"):
        logging.getLogger(name).setLevel(quiet)


# How long a send may wait for its slot in the current task (None: the request's default). A
# message that is optional (the bot's "Received, analysing…") waits less than an answer.
PACE_BUDGET_S: contextvars.ContextVar[float | None] = contextvars.ContextVar("pace_budget_s", default=None)

# Calls that send a message count against Telegram's send limits (contract.pacing).
PACED_METHODS = frozenset({"sendMessage", "sendPhoto", "sendDocument", "editMessageText", "editMessageCaption"})


def paced_chat(endpoint: str, request_data: RequestData | None) -> int | None:
    """The chat a paced call sends to (None: not paced, or a chat given by @username)."""
    if endpoint not in PACED_METHODS or request_data is None:
        return None
    chat_id = request_data.parameters.get("chat_id")
    return chat_id if isinstance(chat_id, int) else None


class RetryingRequest(HTTPXRequest):
    """``HTTPXRequest`` whose calls and downloads go through ``retrying`` (429 with a short
    ``retry_after``, 5xx and network errors), and with a ``pacer`` wait for a send slot first
    (Telegram's limits, shared with the workers).

    ``getUpdates`` is tried once (the updater has its own retry loop). A send slot further away than
    ``max_pace_wait_s`` raises ``RetryAfter`` without calling Telegram, as Telegram would have.
    """

    def __init__(self, *args: Any, attempts: int = ATTEMPTS, max_inline_wait_s: float = MAX_INLINE_RETRY_AFTER_S,
                 pacer: Any = None, max_pace_wait_s: float = 3.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._attempts = max(1, attempts)
        self._max_inline_wait_s = max_inline_wait_s
        self._pacer = pacer  # contract.pacing.AsyncPacer
        self._max_pace_wait_s = max_pace_wait_s

    async def _wait_for_slot(self, chat_id: int | None) -> None:
        from redis.exceptions import RedisError

        from .pacing import TooLong

        try:
            budget = PACE_BUDGET_S.get()
            await self._pacer.wait_turn(chat_id, self._max_pace_wait_s if budget is None else budget)
        except TooLong as too_long:
            raise RetryAfter(max(1, math.ceil(too_long.wait_s))) from None
        except RedisError as error:  # no shared pace without Redis: send, Telegram's 429s still apply
            logger.warning("send pacing unavailable (%s)", type(error).__name__)

    async def post(self, url: str, request_data: RequestData | None = None, **timeouts: Any) -> Any:
        endpoint = url.rsplit("/", 1)[-1]
        chat_id = paced_chat(endpoint, request_data) if self._pacer is not None else None
        post = super().post

        async def penalise(wait: float) -> None:
            await self._pacer.penalise(chat_id, wait)

        return await retrying(lambda: post(url, request_data, **timeouts), endpoint, "bot",
                              attempts=1 if endpoint == "getUpdates" else self._attempts,
                              max_inline_wait_s=self._max_inline_wait_s,
                              before=None if chat_id is None else lambda: self._wait_for_slot(chat_id),
                              on_flood=None if chat_id is None else penalise)

    async def retrieve(self, url: str, **timeouts: Any) -> bytes:
        """A file download (``getFile``'s path), retried like a call; never logged (the URL holds the token)."""
        retrieve = super().retrieve
        return await retrying(lambda: retrieve(url, **timeouts), "download", "bot", attempts=self._attempts,
                              max_inline_wait_s=self._max_inline_wait_s)
