"""What the bot keeps in Redis: language choice, rate-limit timestamps, short-lived image blobs.

Image bytes live only here (never on disk), under a random key with a TTL of at most an hour;
the delivery worker deletes them once the user has the answer.
"""

from __future__ import annotations

import secrets
import time

from contract.envelope import MODES
from contract.i18n import LANGUAGES, pick_language
from contract.keys import INFERENCE_QUEUE
from contract.redis_client import AsyncStore
from contract.settings import ServiceSettings

# Sliding window: drop timestamps older than the window, admit if fewer than the limit remain.
# Returns 0 when admitted, otherwise the milliseconds until the oldest timestamp leaves the window.
_RATE_LIMIT_LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return wait
"""

# The bot declares a request lost only if no delivery is running (lock) and none has finished (done);
# its own "done" mark then makes a late delivery skip the request (worker.deliver.send_reply).
_CLAIM_LOST_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], 'lost', 'EX', tonumber(ARGV[1]))
return 1
"""


class Store(AsyncStore):
    """The bot's Redis (``broker`` None, another broker kind: no queue position)."""

    def __init__(self, settings: ServiceSettings):
        super().__init__(settings)
        self._rate_script = self.redis.register_script(_RATE_LIMIT_LUA)
        self._claim_script = self.redis.register_script(_CLAIM_LOST_LUA)

    # ------------------------------------------------------------- language
    async def language(self, user_id: int | None, telegram_code: str | None) -> str:
        """The remembered /language choice (TTL refreshed), else Telegram's language_code."""
        if user_id is not None:
            stored = await self.redis.getex(self.keys.language(user_id), ex=self.settings.LANGUAGE_TTL_S)
            if stored:
                code = stored.decode()
                if code in LANGUAGES:
                    return code
        return pick_language(telegram_code)

    async def set_language(self, user_id: int, language: str) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"unsupported language {language!r}")
        await self.redis.set(self.keys.language(user_id), language, ex=self.settings.LANGUAGE_TTL_S)

    # ------------------------------------------------------------- reply mode
    async def mode(self, chat_id: int) -> str:
        """The chat's /mode choice (TTL refreshed on use), else "screening"."""
        stored = await self.redis.getex(self.keys.mode(chat_id), ex=self.settings.MODE_TTL_S)
        mode = stored.decode() if stored else ""
        return mode if mode in MODES else MODES[0]

    async def set_mode(self, chat_id: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        await self.redis.set(self.keys.mode(chat_id), mode, ex=self.settings.MODE_TTL_S)

    # ------------------------------------------------------------- rate limit
    async def take_image_slot(self, user_id: int) -> tuple[float, str]:
        """Count one image against the user's window: (seconds to wait or 0 when admitted, slot id)."""
        slot = f"{time.time_ns()}-{secrets.token_hex(4)}"
        wait_ms = await self._rate_script(
            keys=[self.keys.rate(user_id)],
            args=[int(time.time() * 1000), self.settings.RATE_LIMIT_WINDOW_S * 1000, self.settings.RATE_LIMIT_IMAGES,
                  slot],
        )
        return float(wait_ms) / 1000.0, slot

    async def give_back_slot(self, user_id: int, slot: str) -> None:
        """An image we could not even download does not count."""
        await self.redis.zrem(self.keys.rate(user_id), slot)

    async def note_refused(self, user_id: int, within_s: int = 10) -> tuple[int, int, int | None]:
        """Count one refused image of the current burst (refusals less than ``within_s`` apart).

        Returns (images refused in this burst, images accepted in the limit window, the message id
        of this burst's notice or None): one notice per burst (an album over the limit gets one
        notice, not ten), edited as more images are refused.
        """
        key = self.keys.rate_notice(user_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "refused", 1)
            pipe.expire(key, within_s)
            pipe.hget(key, "message")
            pipe.zcard(self.keys.rate(user_id))
            refused, _, message, accepted = await pipe.execute()
        return int(refused), int(accepted), int(message) if message else None

    async def set_rate_notice(self, user_id: int, message_id: int) -> int:
        """Remember the burst's notice; returns how many images the burst has refused by now."""
        key = self.keys.rate_notice(user_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "message", message_id)
            pipe.hget(key, "refused")
            _, refused = await pipe.execute()
        return int(refused or 0)

    # ------------------------------------------------------------- blobs
    @staticmethod
    def new_request_id() -> str:
        return secrets.token_urlsafe(16)

    async def put_blob(self, user_id: int, data: bytes, request_id: str | None = None) -> tuple[str, str]:
        """Store image bytes under a random key with the blob TTL; returns (request_id, blob_key).

        ``request_id``: the id a first, interrupted run of the same update chose (``bot.intake``).
        """
        request_id = request_id or self.new_request_id()
        blob_key = self.keys.blob(request_id)
        ttl = self.settings.BLOB_TTL_S
        index = self.keys.user_requests(user_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(blob_key, data, ex=ttl)
            pipe.sadd(index, request_id)
            pipe.expire(index, ttl)
            await pipe.execute()
        return request_id, blob_key

    async def drop_blob(self, user_id: int, request_id: str) -> None:
        await self.redis.delete(self.keys.blob(request_id))
        await self.redis.srem(self.keys.user_requests(user_id), request_id)

    # ------------------------------------------------------------- requests in flight
    async def request_states(self, request_ids: list[str]) -> list[tuple[bool, bool]]:
        """(answered, image still held) per request: ``done:<id>`` and ``blob:<id>`` exist."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.exists(self.keys.done(request_id))
                pipe.exists(self.keys.blob(request_id))
            replies = await pipe.execute()
        return [(bool(replies[i]), bool(replies[i + 1])) for i in range(0, len(replies), 2)]

    async def claim_lost(self, request_id: str) -> bool:
        """Mark a request whose task and image are gone as finished by the bot (see ``bot.pending``)."""
        claimed = await self._claim_script(keys=[self.keys.done(request_id), self.keys.lock(request_id)],
                                           args=[self.settings.MARK_TTL_S])
        return bool(claimed)

    # ------------------------------------------------------------- order of a chat's replies
    async def take_turn(self, chat_id: int, request_id: str, message_id: int) -> None:
        """Record an accepted request in its chat's order (``contract.bursts``): by the image's message id."""
        turns = self.keys.turns(chat_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(turns, {request_id: message_id})
            pipe.expire(turns, self.settings.BLOB_TTL_S)
            await pipe.execute()

    async def leave_turn(self, chat_id: int, request_id: str) -> None:
        """Not analysed after all (download failed, too large…): later replies need not wait for it."""
        await self.redis.zrem(self.keys.turns(chat_id), request_id)

    # ------------------------------------------------------------- forget
    async def forget(self, user_id: int) -> int:
        """Delete everything held about the user; returns how many keys existed."""
        index = self.keys.user_requests(user_id)
        request_ids = [member.decode() for member in await self.redis.smembers(index)]
        keys = [index, self.keys.language(user_id), self.keys.rate(user_id), self.keys.rate_notice(user_id),
                self.keys.mode(user_id), self.keys.turns(user_id), self.keys.ack_burst(user_id),
                self.keys.pace_wanted(user_id)]  # a private chat's id is the user's id
        burst = await self.redis.get(self.keys.ack_burst(user_id))
        if burst:
            keys += [self.keys.ack(burst.decode()), self.keys.ack_open(burst.decode())]
        for request_id in request_ids:
            keys += [self.keys.blob(request_id), self.keys.overlay(request_id), self.keys.ack_of(request_id)]
        return int(await self.redis.delete(*keys))

    # ------------------------------------------------------------- queue
    async def queue_length(self) -> int:
        """Requests waiting in the inference queue (not counting those being processed)."""
        if self.broker is None:
            return 0
        try:
            return int(await self.broker.llen(INFERENCE_QUEUE))
        except Exception:  # the position is a courtesy; never fail a request over it
            return 0
