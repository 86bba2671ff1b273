"""Which requests still have a task somewhere in Redis: queued, held by a worker, or parked for later.

A request's work always travels as one Celery message carrying its envelope (``diagnose`` or
``deliver``, keyword argument ``envelope``). That message is in exactly one of these places:

* a queue list on the broker (``inference`` or ``delivery``; nothing is sent with a priority, so
  each queue is one list);
* kombu's ``unacked`` hash on the broker, while a worker holds it (running, or waiting for a short
  countdown: tasks are acknowledged late);
* the scheduler's sorted set on the store Redis (``worker.scheduler``: a long retry countdown).

Every hand-over writes the next place before it leaves the previous one (``deliver`` is published
before ``diagnose`` is acknowledged; a retry is published or parked before the run ends; the
scheduler publishes before it removes its entry), except Redis' BRPOP, which takes the message off
the queue before kombu records it in ``unacked``: a worker killed in that instant loses it. So a
request found nowhere on two checks in a row, and not answered, has lost its task (``bot.pending``).

Reading order matters, since the two Redis servers cannot be read in one transaction: the
scheduler's set first, then the broker's lists and hash in one transaction; an entry published in
between is then seen on the broker.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from redis.asyncio import Redis

from contract.keys import DELIVERY_QUEUE, INFERENCE_QUEUE

QUEUES = (INFERENCE_QUEUE, DELIVERY_QUEUE)
UNACKED = "unacked"  # kombu's Redis transport: delivery tag → JSON [message, exchange, routing key]
# A message this module cannot parse (another kombu/Celery message format): then no request can be
# shown lost, since its task may be that message; re-enqueueing everything would answer twice.
UNREADABLE = "<unreadable>"


def _request_id(kwargs: Any) -> str | None:
    envelope = kwargs.get("envelope") if isinstance(kwargs, dict) else None
    request_id = envelope.get("request_id") if isinstance(envelope, dict) else None
    return request_id if isinstance(request_id, str) else None


def _message_request_id(message: Any) -> str | None:
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return _request_id(json.loads(body)[1])


def message_request_id(raw: bytes | str) -> str | None:
    """The request id of one Celery message as kombu stores it in a queue list (JSON; ``body`` base64
    of JSON ``[args, kwargs, embed]``); None for a task without an envelope; UNREADABLE otherwise."""
    try:
        return _message_request_id(json.loads(raw))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return UNREADABLE


def unacked_request_id(raw: bytes | str) -> str | None:
    """The request id of an ``unacked`` hash value (JSON ``[message, exchange, routing_key]``)."""
    try:
        return _message_request_id(json.loads(raw)[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return UNREADABLE


def scheduled_request_id(raw: bytes | str) -> str | None:
    """The request id of a ``worker.scheduler`` entry (JSON with ``kwargs``)."""
    try:
        return _request_id(json.loads(raw).get("kwargs"))
    except (ValueError, AttributeError):
        return UNREADABLE


async def request_ids_in_flight(broker: Redis, store: Redis, scheduled_key: str) -> set[str] | None:
    """Ids of the requests that have a task message anywhere (see the module's docstring); None when
    some message could not be read, so that nothing can be called lost."""
    found = {scheduled_request_id(entry) for entry in await store.zrange(scheduled_key, 0, -1)}
    async with broker.pipeline(transaction=True) as pipe:
        for queue in QUEUES:
            pipe.lrange(queue, 0, -1)
        pipe.hvals(UNACKED)
        *queued, held = await pipe.execute()
    for messages in queued:
        found.update(message_request_id(message) for message in messages)
    found.update(unacked_request_id(message) for message in held)
    found.discard(None)
    if UNREADABLE in found:
        return None
    return found  # type: ignore[return-value]
