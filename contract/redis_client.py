"""One Redis client factory for the bot (asyncio) and the workers (sync): retries with reconnect; and
``AsyncStore``, what the bot's and the API's stores share (their clients, close, ping); and
``claim_empty_db``, a Redis database of its own for a test session or a benchmark.

``from_url`` alone retries nothing, so after a Redis restart the first command of every pooled
connection would fail (and with it one user's request) before the connection is replaced.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from .settings import ServiceSettings

RETRIES = 3
LOCK_KEY = "xray-second-opinion:test-session-lock"  # marks a database claimed by claim_empty_db


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=1.0, base=0.05)


def connect(url: str, **options: Any) -> redis.Redis:
    """A synchronous client (workers, metrics) that retries and reconnects."""
    return redis.Redis.from_url(url, retry=Retry(_backoff(), RETRIES), **options)


def connect_async(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client (the bot) that retries and reconnects."""
    return aioredis.Redis.from_url(url, retry=AsyncRetry(_backoff(), RETRIES), **options)


class AsyncStore:
    """The base of the bot's (``bot.store.Store``) and the API's (``api.store.ApiStore``) Redis stores:
    the settings and key layout, a client for ``REDIS_URL`` and one for the Celery broker (the same
    client when the broker is that Redis; None for another broker kind, where queues cannot be looked at)."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.keys = settings.keys
        self.redis = connect_async(settings.REDIS_URL)
        broker = settings.broker_url
        if broker == settings.REDIS_URL:
            self.broker: aioredis.Redis | None = self.redis
        elif urlsplit(broker).scheme in ("redis", "rediss", "unix"):
            self.broker = connect_async(broker)
        else:
            self.broker = None

    async def close(self) -> None:
        await self.redis.aclose()
        if self.broker is not None and self.broker is not self.redis:
            await self.broker.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())


def claim_empty_db(explicit: str | None = None, base_url: str = "redis://127.0.0.1:6379") -> tuple[str, redis.Redis]:
    """``(url, client)`` of an empty Redis database among 2…15, locked with ``LOCK_KEY`` (an hour) so that
    two test sessions or benchmarks on one machine never share queues or keys; ``explicit`` (a URL the
    caller was given) is used as it is. Raises ``redis.ConnectionError`` when Redis does not answer."""
    if explicit:
        client = redis.Redis.from_url(explicit)
        client.ping()
        return explicit, client
    for db in range(2, 16):
        client = redis.Redis.from_url(f"{base_url}/{db}")
        client.ping()
        if client.set(LOCK_KEY, str(os.getpid()), nx=True, ex=3600):
            if client.dbsize() == 1:
                return f"{base_url}/{db}", client
            client.delete(LOCK_KEY)
        client.close()
    raise RuntimeError("no empty Redis database (2-15) is free")
