"""The bot's HTTP layer: python-telegram-bot's ``HTTPXRequest`` plus a few retries for 429 and 5xx.

Without it one "Too Many Requests" or "Bad Gateway" from Telegram fails the whole handler: the
acknowledgement of an image, a command's answer or a download is lost. Here a 429 whose
``retry_after`` is short is waited out, and 5xx answers are retried with a short backoff; longer
waits and every other error go to the caller as usual (``RetryAfter``, ``NetworkError`` …).
``getUpdates`` is left alone (the updater has its own retry loop). URLs are never logged: they
contain the bot token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

from telegram.request import HTTPXRequest, RequestData

logger = logging.getLogger(__name__)

ATTEMPTS = 3  # tries per Bot API call
MAX_INLINE_RETRY_AFTER_S = 5.0  # a 429 asking for longer is raised to the caller
BACKOFF_BASE_S = 0.3


def _retry_after(payload: bytes) -> float | None:
    try:
        value = json.loads(payload)["parameters"]["retry_after"]
        return float(value)
    except (ValueError, KeyError, TypeError):
        return None


class RetryingRequest(HTTPXRequest):
    """``HTTPXRequest`` that retries a Bot API call on 429 (short ``retry_after``) and on 5xx."""

    def __init__(self, *args: Any, attempts: int = ATTEMPTS, max_inline_wait_s: float = MAX_INLINE_RETRY_AFTER_S,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._attempts = max(1, attempts)
        self._max_inline_wait_s = max_inline_wait_s

    async def do_request(self, url: str, method: str, request_data: RequestData | None = None,
                         **timeouts: Any) -> tuple[int, bytes]:
        endpoint = url.rsplit("/", 1)[-1]
        attempt = 0
        while True:
            code, payload = await super().do_request(url, method, request_data, **timeouts)
            attempt += 1
            if code < 429 or attempt >= self._attempts or endpoint == "getUpdates":
                return code, payload
            if code == 429:
                wait = _retry_after(payload)
                if wait is None or wait > self._max_inline_wait_s:
                    return code, payload
                wait += 0.1
            elif code >= 500:
                # jitter, not security-relevant randomness
                wait = BACKOFF_BASE_S * (2 ** (attempt - 1)) * (0.5 + random.random())  # nosec B311
            else:
                return code, payload
            logger.info("%s: HTTP %d, retrying in %.1fs", endpoint, code, wait)
            await asyncio.sleep(wait)
