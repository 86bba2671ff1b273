"""Telegram's send limits, shared by every process that sends: a token bucket per limit, kept in Redis.

Telegram lets a bot send about 30 messages per second overall, about one per second to one chat and
about 20 per minute to one group; beyond that it answers 429 with ``retry_after``. Every delivery
worker (on any machine) reserves a send slot here before each message, so together they stay
under the limits instead of discovering them through 429s.

Each limit is a GCRA bucket (the "generic cell rate algorithm", a token bucket stored as one
number): the key holds the *theoretical arrival time* of the next message in milliseconds of
Redis' clock. One Lua script checks the buckets a message passes through (the overall one, and
the chat's or the group's) and reserves a slot in all of them at once, atomically: the chat must
be free now, the overall queue may hand out a slot a little in the future; callers sleep until
their slot. A wait longer than the caller accepts reserves nothing and is reported, so a delivery
task can be rescheduled instead of holding a worker. Redis' own clock (``TIME``) is used, so
workers on machines with skewed clocks still agree.

A 429 that gets through anyway (other bots of the same token, limits lower than configured)
pushes the chat's bucket (or the global one) to ``now + retry_after``: every worker then honours
Telegram's ``retry_after``, not only the one that was told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .keys import Keys

# KEYS[1]: the overall bucket; KEYS[2] (optional): the chat's bucket, then KEYS[3]: the chat's "wanted"
# mark. ARGV[1]: the longest wait (ms) the caller accepts; ARGV[2]: 1 for a priority sender; ARGV[3]: how
# many buckets; then per bucket: interval (ms), burst. Returns {reserved (0/1), wait in ms as a string}.
# The chat's bucket must allow a message *now* (else nothing is reserved and the caller retries after
# the returned wait); the overall bucket is a queue shared by every chat: a slot in it is reserved
# even when it lies a little in the future. Reserving future slots of one chat in the overall bucket
# would hold up every other chat behind it.
# Priority: the bot's own messages (acknowledgements, notices, answers to commands: what a user waits
# for right now) go before the workers' replies to the same chat. A priority sender that finds the
# chat busy marks it wanted until shortly after its slot; while the mark stands, other senders leave
# the chat's next slot to it. The mark goes when the priority sender reserves.
_RESERVE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local max_wait = tonumber(ARGV[1])
local priority = tonumber(ARGV[2]) == 1
local buckets = tonumber(ARGV[3])
local tats = {}
for i = 1, buckets do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
end
local function earliest(i)
  return tats[i] - tonumber(ARGV[2 + 2 * i]) * (tonumber(ARGV[3 + 2 * i]) - 1)
end
local wanted = KEYS[buckets + 1]
for i = 2, buckets do
  local wait = earliest(i) - now
  if wait > 0 then
    if priority then
      redis.call('SET', wanted, '1', 'PX', math.ceil(wait) + 1000)
    end
    return {0, string.format('%.3f', wait)}
  end
  if (not priority) and redis.call('EXISTS', wanted) == 1 then
    return {0, string.format('%.3f', tonumber(ARGV[2 + 2 * i]))}
  end
end
local send_at = math.max(now, earliest(1))
if send_at - now > max_wait then
  return {0, string.format('%.3f', send_at - now)}
end
for i = 1, buckets do
  local tat = math.max(tats[i], send_at) + tonumber(ARGV[2 * i + 2])
  redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
if priority and wanted then
  redis.call('DEL', wanted)
end
return {1, string.format('%.3f', send_at - now)}
"""

# KEYS[1]: a bucket; ARGV: retry_after (ms), the bucket's interval (ms) and burst. Nobody sends through
# it before now + retry_after.
_PENALISE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local open_at = now + tonumber(ARGV[1])
local tat = open_at + tonumber(ARGV[2]) * (tonumber(ARGV[3]) - 1)
if tat > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
return 1
"""


@dataclass(frozen=True)
class Rate:
    """``per_s`` messages per second on average, at most ``burst`` back to back."""

    per_s: float
    burst: int = 1

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.per_s


@dataclass(frozen=True)
class Limits:
    """Telegram's documented limits, a little under them (network jitter must not push us over).

    ``from_settings`` reads TELEGRAM_MESSAGES_PER_S, TELEGRAM_CHAT_MESSAGES_PER_S and
    TELEGRAM_GROUP_MESSAGES_PER_MIN.
    """

    # ~30 messages/s per bot. Kept at two thirds of it, one at a time: senders wake up late on a busy
    # machine and the network jitters, so messages leave in clumps that must still fit.
    overall: Rate = Rate(20.0, 1)
    private_chat: Rate = Rate(1.0, 2)  # ~1 message/s per chat; a reply's text and photo may go together
    group: Rate = Rate(19 / 60, 1)  # ~20 messages/min per group: at most 20 in any minute

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(overall=Rate(settings.TELEGRAM_MESSAGES_PER_S, 1),
                   private_chat=Rate(settings.TELEGRAM_CHAT_MESSAGES_PER_S, 2),
                   group=Rate(settings.TELEGRAM_GROUP_MESSAGES_PER_MIN / 60, 1))


class TooLong(Exception):
    """The next slot is further away than the caller accepts; nothing was reserved."""

    def __init__(self, wait_s: float):
        super().__init__(f"next send slot in {wait_s:.1f}s")
        self.wait_s = wait_s


class _Buckets:
    """Which buckets a message to ``chat_id`` passes through, and the script arguments for them."""

    def __init__(self, keys: Keys, limits: Limits):
        self.keys = keys
        self.limits = limits

    def key_and_rate(self, chat_id: int | None) -> tuple[str, Rate]:
        if chat_id is None:
            return self.keys.pace_overall(), self.limits.overall
        # Negative ids are groups, supergroups and channels (Telegram's convention).
        return self.keys.pace_chat(chat_id), self.limits.group if chat_id < 0 else self.limits.private_chat

    def reserve_args(self, chat_id: int | None, max_wait_s: float,
                     priority: bool = False) -> tuple[list[str], list[Any]]:
        buckets = (None, chat_id) if chat_id is not None else (None,)
        keys: list[str] = []
        args: list[Any] = [max_wait_s * 1000.0, int(priority), len(buckets)]
        for bucket in buckets:
            key, rate = self.key_and_rate(bucket)
            keys.append(key)
            args += [rate.interval_ms, rate.burst]
        if chat_id is not None:
            keys.append(self.keys.pace_wanted(chat_id))
        return keys, args

    def penalty_args(self, chat_id: int | None, retry_after_s: float) -> tuple[list[str], list[Any]]:
        key, rate = self.key_and_rate(chat_id)
        return [key], [retry_after_s * 1000.0, rate.interval_ms, rate.burst]


def _parse(reply: Any) -> tuple[bool, float]:
    reserved, wait_ms = reply
    return bool(int(reserved)), float(wait_ms) / 1000.0


class Pacer:
    """Synchronous (redis-py) pacing for the delivery workers."""

    def __init__(self, redis_client: Any, keys: Keys | None = None, limits: Limits | None = None,
                 sleep: Callable[[float], None] = time.sleep, priority: bool = False):
        self.buckets = _Buckets(keys or Keys("xso:"), limits or Limits())
        self.priority = priority  # a chat's next slot goes to a priority sender first (see _RESERVE_LUA)
        self._reserve = redis_client.register_script(_RESERVE_LUA)
        self._penalise = redis_client.register_script(_PENALISE_LUA)
        self._sleep = sleep

    def try_reserve(self, chat_id: int | None, max_wait_s: float) -> tuple[bool, float]:
        """One attempt: ``(True, wait)`` reserved a slot ``wait`` seconds from now; ``(False, wait)``
        reserved nothing: the chat is busy (ask again after ``wait``) or the slot is too far away."""
        keys, args = self.buckets.reserve_args(chat_id, max_wait_s, self.priority)
        return _parse(self._reserve(keys=keys, args=args))

    def wait_turn(self, chat_id: int | None, max_wait_s: float) -> float:
        """Sleep until this process may send a message to ``chat_id``; returns the seconds waited.

        Raises ``TooLong`` (holding no slot) when that would take more than ``max_wait_s``.
        """
        waited = 0.0
        while True:
            reserved, wait = self.try_reserve(chat_id, max_wait_s - waited)
            if wait > max_wait_s - waited:
                raise TooLong(waited + wait)
            if wait > 0:
                self._sleep(wait)
            waited += wait
            if reserved:
                return waited

    def penalise(self, chat_id: int | None, retry_after_s: float) -> None:
        """Telegram answered 429: hold every sender to ``chat_id`` (None: all chats) for ``retry_after_s``."""
        keys, args = self.buckets.penalty_args(chat_id, retry_after_s)
        self._penalise(keys=keys, args=args)


class AsyncPacer:
    """The same buckets for asyncio code (``redis.asyncio``): the bot's own messages share them."""

    def __init__(self, redis_client: Any, keys: Keys | None = None, limits: Limits | None = None,
                 priority: bool = False):
        self.buckets = _Buckets(keys or Keys("xso:"), limits or Limits())
        self.priority = priority
        self._reserve = redis_client.register_script(_RESERVE_LUA)
        self._penalise = redis_client.register_script(_PENALISE_LUA)

    async def try_reserve(self, chat_id: int | None, max_wait_s: float) -> tuple[bool, float]:
        keys, args = self.buckets.reserve_args(chat_id, max_wait_s, self.priority)
        return _parse(await self._reserve(keys=keys, args=args))

    async def wait_turn(self, chat_id: int | None, max_wait_s: float) -> float:
        waited = 0.0
        while True:
            reserved, wait = await self.try_reserve(chat_id, max_wait_s - waited)
            if wait > max_wait_s - waited:
                raise TooLong(waited + wait)
            if wait > 0:
                await asyncio.sleep(wait)
            waited += wait
            if reserved:
                return waited

    async def penalise(self, chat_id: int | None, retry_after_s: float) -> None:
        keys, args = self.buckets.penalty_args(chat_id, retry_after_s)
        await self._penalise(keys=keys, args=args)
