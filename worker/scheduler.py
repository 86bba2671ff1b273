"""Delayed tasks kept in a Redis sorted set, so the broker's visibility timeout can stay short.

Celery's own ``retry(countdown=…)`` publishes a message with an ETA that a worker fetches at once
and holds, *unacknowledged*, until the ETA. With the Redis broker an unacknowledged message is
handed to another worker once the visibility timeout has passed, so the timeout had to cover the
longest countdown (minutes of Telegram flood waits), and a dead worker's task came back only
after that long. Here a countdown longer than ``CELERY_COUNTDOWN_MAX_S`` is parked in a sorted set
(score = when it is due, Redis' clock) instead, the running task finishes and is acknowledged,
and a small loop in every worker process publishes due entries as ordinary messages. The
broker then only ever holds a message for one task run (≤ the hard time limit) plus a short
countdown, and the visibility timeout is sized to that.

Publishing is at least once: an entry is leased (its score moved ``LEASE_S`` ahead) before it is
published and removed after, so a worker dying in between leaves it to be published again after
the lease. The tasks are idempotent (delivery marks, ``done:<id>``), so a second copy is harmless.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from typing import Any

logger = logging.getLogger(__name__)

CELERY_COUNTDOWN_MAX_S = 5.0  # shorter countdowns stay with Celery (held unacknowledged briefly)
LEASE_S = 30.0  # a leased entry not removed within this is published again
POLL_INTERVAL_S = 0.5

# The set expires an hour after its latest entry is due (every service key has a TTL).
_ADD_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
local keep = math.ceil(tonumber(ARGV[1]) / 1000) + 3600
if redis.call('TTL', KEYS[1]) < keep then
  redis.call('EXPIRE', KEYS[1], keep)
end
return 1
"""

# Due entries (score <= now), at most ARGV[2], leased for ARGV[1] ms.
_LEASE_DUE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), member)
end
return due
"""


class Scheduler:
    """``later(…)`` parks a task; ``publish_due()`` (run by ``start_loop``) sends those that are due."""

    def __init__(self, redis_client: Any, app: Any, key: str):
        self.redis = redis_client
        self.app = app
        self.key = key
        self._add = redis_client.register_script(_ADD_LUA)
        self._lease_due = redis_client.register_script(_LEASE_DUE_LUA)

    def later(self, task: str, kwargs: dict[str, Any], queue: str, delay_s: float, retries: int) -> None:
        """Publish ``task(**kwargs)`` on ``queue`` in ``delay_s`` seconds, as retry number ``retries``."""
        entry = json.dumps({"id": secrets.token_hex(8), "task": task, "kwargs": kwargs, "queue": queue,
                            "retries": retries}, separators=(",", ":"), sort_keys=True)
        self._add(keys=[self.key], args=[max(0.0, delay_s) * 1000.0, entry])

    def publish_due(self, limit: int = 100) -> int:
        """Publish every due entry (at least once); returns how many were published."""
        published = 0
        for member in self._lease_due(keys=[self.key], args=[LEASE_S * 1000.0, limit]):
            try:
                entry = json.loads(member)
                self.app.send_task(entry["task"], kwargs=entry["kwargs"], queue=entry["queue"],
                                   retries=int(entry["retries"]))
            except Exception:
                logger.exception("scheduled task could not be published; it is tried again in %.0fs", LEASE_S)
                continue
            self.redis.zrem(self.key, member)
            published += 1
        return published

    def pending(self) -> int:
        return int(self.redis.zcard(self.key))

    def start_loop(self, interval_s: float = POLL_INTERVAL_S) -> threading.Event:
        """A daemon thread publishing due entries every ``interval_s``; set the returned event to stop it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.publish_due()
                except Exception as error:  # Redis down: next round
                    logger.debug("scheduler round skipped: %s", type(error).__name__)

        threading.Thread(target=loop, name="task-scheduler", daemon=True).start()
        return stop
