"""What the API keeps in Redis (``contract.keys``): the image, the request record, idempotency keys,
rate and quota counters. Every key has a TTL; the image and the analysis live at most BLOB_TTL_S.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from contract.analyses import decode_hash, now_iso, resource
from contract.redis_client import AsyncStore
from contract.settings import ServiceSettings

# Daily quota and sliding-window rate limit in one step. Returns {0, 0} admitted, {1, ms} rate
# limited (ms until the oldest request leaves the window), {2, 0} daily quota used up.
# KEYS: rate zset, quota counter. ARGV: now ms, window ms, limit, member, quota, quota ttl s.
_ADMIT_LUA = """
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used >= tonumber(ARGV[5]) then return {2, 0} end
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  if wait < 1 then wait = 1 end
  return {1, wait}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
return {0, 0}
"""


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()) + 1)


class ApiStore(AsyncStore):
    """The API's Redis (``broker`` None, another broker kind: lost tasks cannot be looked for)."""

    def __init__(self, settings: ServiceSettings):
        super().__init__(settings)
        self._admit = self.redis.register_script(_ADMIT_LUA)

    @staticmethod
    def new_request_id() -> str:
        return secrets.token_urlsafe(16)

    async def admit(self, client: str) -> tuple[str, float]:
        """("ok", 0), ("rate", seconds to wait) or ("quota", seconds to UTC midnight)."""
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        code, wait_ms = await self._admit(
            keys=[self.keys.api_rate(client), self.keys.api_quota(client, day)],
            args=[int(time.time() * 1000), self.settings.API_RATE_WINDOW_S * 1000, self.settings.API_RATE_LIMIT,
                  f"{time.time_ns()}-{secrets.token_hex(4)}", self.settings.API_DAILY_QUOTA, 2 * 24 * 3600])
        if int(code) == 2:
            return "quota", float(seconds_to_utc_midnight())
        if int(code) == 1:
            return "rate", float(wait_ms) / 1000.0
        return "ok", 0.0

    def _idempotency(self, client: str, idempotency_key: str) -> str:
        return self.keys.api_idempotency(client, hashlib.sha256(idempotency_key.encode()).hexdigest()[:32])

    async def release_idempotency(self, client: str, idempotency_key: str) -> None:
        """The request was refused (429): the same key may be used again."""
        await self.redis.delete(self._idempotency(client, idempotency_key))

    async def claim_idempotency(self, client: str, idempotency_key: str, request_id: str,
                                fingerprint: str) -> tuple[str | None, str | None]:
        """(None, None) when this key is new (now bound to ``request_id`` and the request's
        ``fingerprint``), else (the id, the fingerprint) it was bound to."""
        name = self._idempotency(client, idempotency_key)
        if await self.redis.set(name, f"{request_id} {fingerprint}", nx=True, ex=self.settings.BLOB_TTL_S):
            return None, None
        existing = await self.redis.get(name)
        if not existing:
            return None, None
        bound_id, _, bound_fingerprint = existing.decode().partition(" ")
        return bound_id, bound_fingerprint

    async def accept(self, request_id: str, client: str, data: bytes, mode: str, language: str,
                     callback_url: str | None) -> None:
        """Image, request record and watchdog entry in one transaction, all with the blob TTL."""
        ttl = self.settings.BLOB_TTL_S
        meta = {"client": client, "mode": mode, "language": language, "created_at": now_iso(),
                "callback_url": callback_url or ""}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.blob(request_id), data, ex=ttl)
            pipe.hset(self.keys.api_request(request_id), mapping=meta)
            pipe.expire(self.keys.api_request(request_id), ttl)
            pipe.zadd(self.keys.api_pending(), {request_id: time.time()})
            await pipe.execute()

    async def forget_accept(self, request_id: str) -> None:
        """Enqueueing failed: nothing is left behind (the client is told 503)."""
        await self.redis.delete(self.keys.blob(request_id), self.keys.api_request(request_id))
        await self.redis.zrem(self.keys.api_pending(), request_id)

    async def meta(self, request_id: str) -> dict[str, str]:
        return decode_hash(await self.redis.hgetall(self.keys.api_request(request_id)))

    async def document(self, request_id: str, client: str) -> dict[str, Any] | None:
        """The analysis document, or None when unknown, expired, deleted or another client's."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.api_request(request_id))
            pipe.get(self.keys.api_result(request_id))
            pipe.exists(self.keys.attempts(request_id))
            raw_meta, raw_answer, started = await pipe.execute()
        meta = decode_hash(raw_meta)
        if meta.get("client") != client:
            return None
        answer = json.loads(raw_answer) if raw_answer else None
        return resource(request_id, meta, answer, processing=bool(started))

    async def overlay(self, request_id: str, label: str) -> bytes | None:
        return await self.redis.hget(self.keys.overlay(request_id), label)

    async def delete(self, request_id: str) -> None:
        """Everything held for the request; the done mark makes a queued ``diagnose`` skip it."""
        keys = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_request(request_id), keys.api_result(request_id), keys.blob(request_id),
                        keys.overlay(request_id), keys.attempts(request_id), keys.api_callback(request_id))
            pipe.set(keys.done(request_id), "deleted", ex=self.settings.MARK_TTL_S)
            pipe.zrem(keys.api_pending(), request_id)
            await pipe.execute()
