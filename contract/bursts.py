"""Bursts from one chat: one acknowledgement covering several images, and replies in the order sent.

Shared by the bot (which accepts images) and the delivery workers (which answer them); Redis only.

**Acknowledgements.** Twelve photos sent within three seconds cannot get twelve "Received,
analysing…" messages: Telegram lets a bot send about one message per second to a chat
(``contract.pacing``). So the images of a burst share one acknowledgement. Each accepted image
*joins* the chat's open burst (``ack-burst:<chat>``, open for ``ACK_MERGE_S`` after its latest
image) or opens a new one; the bot sends the burst's message once ("Received, analysing…") and
edits it as more images join ("Received 7 images, analysing…"), each send or edit waiting for the
chat's next send slot: nothing is dropped, and no 429 comes from our own pace (``bot.acks``). The
burst remembers its unanswered requests (``ack-open:<burst>``); each answer *leaves* it, and the
last one deletes the message (the answers replace it), as a single image's answer always did.

**Order.** The bot records each accepted request in the chat's ``turns:<chat>`` sorted set, scored
by the message id of the user's image (Telegram numbers a chat's messages in the order they were
sent). Before answering, ``deliver`` looks for earlier requests of the same chat that are neither
answered (``done:<id>``) nor given up; while there are some it parks itself for a moment
(``worker.scheduler``) and looks again. The wait is bounded (``DELIVER_ORDER_WAIT_S`` from its first
look): a request stuck behind a dead worker or a long analysis cannot hold its chat's later answers
for longer than that; the stuck ones are then taken out of the order and answered when they can be.
Exactly-once delivery is untouched: waiting sends nothing, and the delivery marks still decide.
"""

from __future__ import annotations

from typing import Any

from .keys import Keys

# KEYS: ack-burst:<chat>, ack-of:<request>. ARGV: key prefix, a new burst id, request id, chat id,
# merge window (ms), TTL (s). Returns {burst id, images covered, 1 if this call opened the burst}.
# A request joins at most once (a handler run again after a crash gets its burst back).
JOIN_LUA = """
local prefix = ARGV[1]
local known = redis.call('GET', KEYS[2])
if known then
  return {known, tonumber(redis.call('HGET', prefix .. 'ack:' .. known, 'count') or '0'), 0}
end
local burst = redis.call('GET', KEYS[1])
local opened = 0
if (not burst) or redis.call('EXISTS', prefix .. 'ack:' .. burst) == 0 then
  burst = ARGV[2]
  opened = 1
  redis.call('HSET', prefix .. 'ack:' .. burst, 'chat', ARGV[4], 'count', 0)
end
local hash, open = prefix .. 'ack:' .. burst, prefix .. 'ack-open:' .. burst
local ttl = tonumber(ARGV[6])
redis.call('SADD', open, ARGV[3])
local count = redis.call('HINCRBY', hash, 'count', 1)
redis.call('EXPIRE', hash, ttl)
redis.call('EXPIRE', open, ttl)
redis.call('SET', KEYS[2], burst, 'EX', ttl)
redis.call('SET', KEYS[1], burst, 'PX', tonumber(ARGV[5]))
return {burst, count, opened}
"""

# KEYS: ack-of:<request>. ARGV: key prefix, request id. Returns -1: the request is in no burst (an
# older bot, or left already); 0: others of its burst are still unanswered; -2: it was the last and
# the burst's message was never sent; else the message id of the acknowledgement it was the last of.
LEAVE_LUA = """
local prefix = ARGV[1]
local burst = redis.call('GET', KEYS[1])
if not burst then return -1 end
redis.call('DEL', KEYS[1])
local hash, open = prefix .. 'ack:' .. burst, prefix .. 'ack-open:' .. burst
redis.call('SREM', open, ARGV[2])
if redis.call('SCARD', open) > 0 then return 0 end
local chat = redis.call('HGET', hash, 'chat')
local message = redis.call('HGET', hash, 'message')
redis.call('DEL', hash, open)
if chat and redis.call('GET', prefix .. 'ack-burst:' .. chat) == burst then
  redis.call('DEL', prefix .. 'ack-burst:' .. chat)
end
if message then return tonumber(message) end
return -2
"""

# KEYS: ack:<burst>. ARGV: the message id. 0 when the burst was closed meanwhile (all answered).
SET_MESSAGE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'message', ARGV[1])
return 1
"""

UNKNOWN, OTHERS_WAITING, LAST_UNSENT = -1, 0, -2


def leave_ack(r: Any, keys: Keys, request_id: str) -> int:
    """Synchronous ``LEAVE_LUA`` for the workers (see its codes)."""
    return int(r.eval(LEAVE_LUA, 1, keys.ack_of(request_id), keys.prefix, request_id))


def earlier_unanswered(r: Any, keys: Keys, chat_id: int, request_id: str) -> list[str]:
    """Requests of the chat sent before ``request_id`` that are not answered yet (answered ones are
    taken out of the order on the way). [] when the request is not in the order (an older bot)."""
    turns = keys.turns(chat_id)
    mine = r.zscore(turns, request_id)
    if mine is None:
        return []
    earlier = [m.decode() if isinstance(m, bytes) else m for m in r.zrangebyscore(turns, "-inf", f"({mine}")]
    if not earlier:
        return []
    done = r.mget([keys.done(other) for other in earlier])
    answered = [other for other, mark in zip(earlier, done, strict=True) if mark is not None]
    if answered:
        r.zrem(turns, *answered)
    return [other for other, mark in zip(earlier, done, strict=True) if mark is None]


def leave_turns(r: Any, keys: Keys, chat_id: int, *request_ids: str) -> None:
    """Take requests out of their chat's order (answered, given up, or waited for long enough)."""
    if request_ids:
        r.zrem(keys.turns(chat_id), *request_ids)
