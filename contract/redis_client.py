"""One Redis client factory for the bot (asyncio) and the workers (sync): retries with reconnect.

``from_url`` alone retries nothing, so after a Redis restart the first command of every pooled
connection would fail (and with it one user's request) before the connection is replaced.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

RETRIES = 3


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=1.0, base=0.05)


def connect(url: str, **options: Any) -> redis.Redis:
    """A synchronous client (workers, metrics) that retries and reconnects."""
    return redis.Redis.from_url(url, retry=Retry(_backoff(), RETRIES), **options)


def connect_async(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client (the bot) that retries and reconnects."""
    return aioredis.Redis.from_url(url, retry=AsyncRetry(_backoff(), RETRIES), **options)
