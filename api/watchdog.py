"""Accepted API requests that are never answered: the bot's watchdog rules (``bot.pending``), in Redis.

Every accepted request sits in the sorted set ``api-pending`` (score: when it was accepted) until
its answer is stored. One API process at a time (a short Redis lock) checks them every
API_WATCHDOG_S seconds:

* answered (``done:<id>``), or older than the blob TTL plus the grace → dropped from the set;
* image held but its task in no queue, no worker's hands and no scheduler (``bot.inflight``), twice
  in a row → ``diagnose`` enqueued again (at most ``MAX_REQUEUES`` times; then as below);
* image gone and no answer for ``lost_grace_s`` (Redis lost it, or it was requeued too often) →
  the request is answered "lost" (``STORE_ANSWER_LUA``: a late worker answer is then dropped), so
  a client polling or waiting for its callback is told, never left waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bot.inflight import request_ids_in_flight
from contract import texts
from contract.analyses import STORE_ANSWER_LUA, answer_keys, dumps, now_iso
from contract.envelope import RequestEnvelope

from .store import ApiStore

log = logging.getLogger(__name__)

MAX_REQUEUES = 2


class Watchdog:
    def __init__(self, store: ApiStore, requeue: Callable[[RequestEnvelope], Awaitable[Any]]):
        self.store, self.requeue = store, requeue
        self.settings, self.keys, self.redis = store.settings, store.keys, store.redis
        self._unseen: dict[str, int] = {}
        self._missing_since: dict[str, float] = {}

    async def check(self, now: float | None = None) -> list[str]:
        """One round; returns the ids answered "lost"."""
        now = time.time() if now is None else now
        lock_s = max(1, int(self.settings.API_WATCHDOG_S))
        if not await self.redis.set(self.keys.api_watchdog(), "1", nx=True, ex=lock_s):
            return []  # another API process does this round
        entries = await self.redis.zrange(self.keys.api_pending(), 0, -1, withscores=True)
        ids = [(member.decode(), score) for member, score in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id, _ in ids:
                pipe.exists(self.keys.done(request_id))
                pipe.exists(self.keys.blob(request_id))
            states = await pipe.execute()
        lost: list[str] = []
        held: list[str] = []
        for index, (request_id, accepted) in enumerate(ids):
            done, queued = states[2 * index], states[2 * index + 1]
            if done or now - accepted > self.settings.BLOB_TTL_S + self.settings.lost_grace_s:
                await self.redis.zrem(self.keys.api_pending(), request_id)
                self._forget(request_id)
            elif queued:
                self._missing_since.pop(request_id, None)
                held.append(request_id)
            elif now - self._missing_since.setdefault(request_id, now) >= self.settings.lost_grace_s:
                lost.append(request_id)
        lost += await self._requeue_vanished(held)
        told = [request_id for request_id in lost if await self._answer_lost(request_id)]
        return told

    def _forget(self, request_id: str) -> None:
        self._unseen.pop(request_id, None)
        self._missing_since.pop(request_id, None)

    async def _requeue_vanished(self, held: list[str]) -> list[str]:
        if not held or self.store.broker is None:
            return []
        in_flight = await request_ids_in_flight(self.store.broker, self.redis, self.keys.scheduled())
        if in_flight is None:
            log.warning("a task message in Redis could not be read; no API request is taken for lost this round")
            return []
        give_up: list[str] = []
        for request_id in held:
            if request_id in in_flight:
                self._unseen.pop(request_id, None)
                continue
            self._unseen[request_id] = self._unseen.get(request_id, 0) + 1
            if self._unseen[request_id] < 2:
                continue
            self._unseen[request_id] = 0
            meta = await self.store.meta(request_id)
            if not meta:
                continue
            requeued = int(await self.redis.hincrby(self.keys.api_request(request_id), "requeued", 1))
            if requeued > MAX_REQUEUES:
                give_up.append(request_id)
                continue
            await self.requeue(envelope_for(self.settings.keys, request_id, meta))
            log.warning("API request %s: its task was in no queue; enqueued again (%d of %d)", request_id, requeued,
                        MAX_REQUEUES)
        return give_up

    async def _answer_lost(self, request_id: str) -> bool:
        meta = await self.store.meta(request_id)
        language = meta.get("language", "en")
        answer = {"status": "failed", "completed_at": now_iso(), "result": None, "overlays": [],
                  "error": {"code": "lost", "detail": texts.lost(language)}}
        written = await self.redis.eval(STORE_ANSWER_LUA, 7, *answer_keys(self.keys, request_id), dumps(answer),
                                        self.settings.BLOB_TTL_S, self.settings.MARK_TTL_S, request_id)
        self._forget(request_id)
        if int(written) == 1:
            log.warning("API request %s was lost (its image or task is gone); answered 'lost'", request_id)
            return True
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.API_WATCHDOG_S)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis down: next round
                log.info("API watchdog round skipped: %s", type(error).__name__)


def envelope_for(keys: Any, request_id: str, meta: dict[str, str], callback_url: str | None = None) -> RequestEnvelope:
    """The ``diagnose`` envelope of an API request (the same one the POST enqueued)."""
    return RequestEnvelope(request_id=request_id, blob_key=keys.blob(request_id), chat_id=0, reply_to_message_id=None,
                           language=meta.get("language", "en"), mode=meta.get("mode", "screening"), channel="api",
                           callback_url=callback_url or meta.get("callback_url") or None, client=meta.get("client"))
