"""Requests this bot process accepted and has not yet seen answered: nobody is left waiting in silence.

Redis holds the queue and the images in memory only. If it restarts (or loses data for any other
reason), the queued tasks and the images are gone and no worker will ever answer them. The bot
remembers, in its own memory, the requests it acknowledged; a watchdog checks them every
``PENDING_CHECK_S`` seconds:

* ``done:<id>`` exists → answered (or being told otherwise by a worker): forgotten here;
* the image (``blob:<id>``) still exists → queued or being analysed, as long as its task message
  is somewhere in Redis (``bot.inflight``: a queue, kombu's ``unacked`` hash, the scheduler's set).
  Found nowhere on two checks in a row (a hand-over between two places takes an instant), the task
  was lost: Redis' BRPOP handed it to a worker that died before kombu recorded it (a thread-pool
  worker fetches while it works). The bot then enqueues ``diagnose`` again with the same envelope;
  a request whose analysis had finished and whose ``deliver`` was lost is analysed again. Delivery
  stays exactly once: ``diagnose`` and ``deliver`` skip a request marked ``done``, and ``deliver``
  marks every part it sent. After ``MAX_REQUEUES`` re-enqueues the next loss is told to the user
  (below) and the image is deleted, rather than looping;
* neither, for longer than ``lost_grace_s`` (time for an analysis that already read its image to
  finish and deliver) → the request was lost. The bot *claims* it by setting ``done:<id>`` itself,
  atomically and only if no delivery holds ``lock:<id>`` and no ``done`` mark exists, so a late
  worker result is then skipped and the user never gets both; then it turns the acknowledgement
  ("Received, analysing…") into "please send it again". A delivered answer deletes that
  acknowledgement, so editing it fails when the answer arrived before a restart wiped the marks:
  then nothing is sent.

State lives in the bot process: if the bot and Redis restart together, nothing can be recovered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from telegram import Bot, ReplyParameters
from telegram.error import BadRequest, TelegramError

from contract import texts
from contract.bursts import UNKNOWN
from contract.envelope import RequestEnvelope
from contract.settings import ServiceSettings

from .inflight import request_ids_in_flight
from .store import Store

logger = logging.getLogger(__name__)

MAX_REQUEUES = 2  # re-enqueues of one lost task; the next loss is told to the user


@dataclass
class PendingRequest:
    envelope: RequestEnvelope  # the request as sent to ``diagnose``: where to answer, in which language
    user_id: int  # for /forget
    accepted_at: float  # time.monotonic()
    missing_since: float | None = None
    unseen: int = 0  # consecutive checks that found its image but no task message
    requeued: int = 0  # times the watchdog enqueued its ``diagnose`` again
    burst: str | None = None  # the burst whose acknowledgement covers it (``bot.acks``)

    @property
    def request_id(self) -> str:
        return self.envelope.request_id


class PendingRequests:
    def __init__(self, settings: ServiceSettings, store: Store,
                 requeue: Callable[[RequestEnvelope], Awaitable[Any]] | None = None, acks: Any = None):
        """``requeue``: enqueues ``diagnose`` (``Dispatcher.enqueue``); None: lost tasks are not looked for.
        ``acks``: ``bot.acks.BurstAcks`` (an acknowledgement may cover several images)."""
        self.settings = settings
        self.store = store
        self.requeue = requeue
        self.acks = acks
        self._requests: dict[str, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: PendingRequest) -> None:
        self._requests[request.request_id] = request

    def forget_user(self, user_id: int) -> None:
        """/forget: the user's images are gone on purpose; the worker tells them if one was queued."""
        for request_id in [r.request_id for r in self._requests.values() if r.user_id == user_id]:
            del self._requests[request_id]

    async def check(self, bot: Bot, now: float | None = None) -> list[str]:
        """One watchdog round; returns the ids of the requests declared lost (and told so)."""
        now = time.monotonic() if now is None else now
        requests = list(self._requests.values())
        if not requests:
            return []
        states = await self.store.request_states([r.request_id for r in requests])
        lost: list[PendingRequest] = []
        held: list[PendingRequest] = []
        answered: dict[str, int] = {}  # burst → chat of the requests found answered
        for request, (done, queued) in zip(requests, states, strict=True):
            if done or now - request.accepted_at > self.settings.BLOB_TTL_S + self.settings.lost_grace_s:
                self._requests.pop(request.request_id, None)
                if done and request.burst:
                    answered[request.burst] = request.envelope.chat_id
            elif queued:
                request.missing_since = None
                held.append(request)
            elif request.missing_since is None:
                request.missing_since = now
            elif now - request.missing_since >= self.settings.lost_grace_s:
                lost.append(request)
        await self._delete_orphaned_acks(bot, answered)
        lost += await self._requeue_vanished(held)
        told: list[str] = []
        for request in lost:
            self._requests.pop(request.request_id, None)
            if not await self.store.claim_lost(request.request_id):
                continue  # a worker is delivering it, or has: nothing to say
            logger.warning("request %s was lost (its image or task is gone); asking to resend", request.request_id)
            await self.store.drop_blob(request.user_id, request.request_id)
            if await self._tell(bot, request):
                told.append(request.request_id)
        return told

    async def _delete_orphaned_acks(self, bot: Bot, answered: dict[str, int]) -> None:
        """A burst answered after a Redis restart: its answers could not find the acknowledgement to
        delete (the burst's state was wiped), so "Received, analysing…" would stay under them. This
        process remembers the message; once none of the burst's requests is waiting, it goes."""
        if self.acks is None or not answered:
            return
        waiting = {request.burst for request in self._requests.values()}
        bursts = {burst for burst in answered if burst not in waiting}
        for burst, message_id in (await self.acks.orphaned(bursts)).items():
            self.acks.forget(burst)
            try:
                await bot.delete_message(answered[burst], message_id)
            except TelegramError as error:  # already gone, or Telegram refused: it only stays visible
                logger.info("burst acknowledgement not deleted after a Redis restart: %s", type(error).__name__)

    async def _requeue_vanished(self, held: list[PendingRequest]) -> list[PendingRequest]:
        """Enqueue again the requests whose image is held but whose task is nowhere, twice in a row;
        returns those past ``MAX_REQUEUES`` (to be told)."""
        if not held or self.requeue is None or self.store.broker is None:
            return []
        in_flight = await request_ids_in_flight(self.store.broker, self.store.redis, self.settings.keys.scheduled())
        if in_flight is None:
            logger.warning("a task message in Redis could not be read; no request is taken for lost this round")
            return []
        give_up: list[PendingRequest] = []
        for request in held:
            if request.request_id in in_flight:
                request.unseen = 0
                continue
            request.unseen += 1
            if request.unseen < 2:
                continue
            request.unseen = 0
            if request.requeued >= MAX_REQUEUES:
                give_up.append(request)
                continue
            await self.requeue(request.envelope)
            request.requeued += 1
            logger.warning("request %s: its task was in no queue (lost by the broker); enqueued again (%d of %d)",
                           request.request_id, request.requeued, MAX_REQUEUES)
        return give_up

    async def _tell(self, bot: Bot, pending: PendingRequest) -> bool:
        request = pending.envelope
        text = texts.lost(request.language)
        ack_message_id = request.ack_message_id
        if self.acks is not None:
            # A burst's acknowledgement is turned into the notice only by the last of its images;
            # the others still wait under it, so this one is told in a reply of its own.
            left = await self.acks.leave(request.request_id)
            if left != UNKNOWN:
                ack_message_id = left if left > 0 else None
            elif ack_message_id is None:
                # Redis forgot the burst (a restart). The acknowledgement was sent after the request was
                # queued, so the envelope lacks it; this process remembers it. If an answer arrived
                # before the restart it deleted that message, the edit below fails and nothing is said.
                ack_message_id = self.acks.sent_message(pending.burst)
                self.acks.forget(pending.burst)  # it becomes this notice (or is gone): never deleted later
        if ack_message_id is not None:
            try:
                await bot.edit_message_text(text, chat_id=request.chat_id, message_id=ack_message_id)
                return True
            except BadRequest as error:  # the acknowledgement is gone: the answer replaced it
                logger.info("request %s: acknowledgement not editable (%s); not telling", request.request_id,
                            error.message)
                return False
            except TelegramError as error:
                logger.warning("request %s: editing the acknowledgement failed: %s", request.request_id,
                               type(error).__name__)
        try:
            await bot.send_message(request.chat_id, text, reply_parameters=ReplyParameters(
                message_id=request.reply_to_message_id, allow_sending_without_reply=True))
            return True
        except TelegramError as error:
            logger.warning("request %s: could not tell the user: %s", request.request_id, type(error).__name__)
            return False

    async def run(self, bot: Bot) -> None:
        """The watchdog loop (a task of the bot's event loop; cancelled on stop)."""
        while True:
            await asyncio.sleep(self.settings.PENDING_CHECK_S)
            try:
                await self.check(bot)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis down: try again next round
                logger.info("pending check skipped: %s", type(error).__name__)
