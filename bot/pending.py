"""Requests this bot process accepted and has not yet seen answered: nobody is left waiting in silence.

Redis holds the queue and the images in memory only. If it restarts (or loses data for any other
reason), the queued tasks and the images are gone and no worker will ever answer them. The bot
remembers, in its own memory, the requests it acknowledged; a watchdog checks them every
``PENDING_CHECK_S`` seconds:

* ``done:<id>`` exists → answered (or being told otherwise by a worker): forgotten here;
* the image (``blob:<id>``) still exists → queued or being analysed: nothing to do;
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
from dataclasses import dataclass

from telegram import Bot, ReplyParameters
from telegram.error import BadRequest, TelegramError

from contract import texts
from contract.envelope import RequestEnvelope
from contract.settings import ServiceSettings

from .store import Store

logger = logging.getLogger(__name__)


@dataclass
class PendingRequest:
    envelope: RequestEnvelope  # the request as sent to ``diagnose``: where to answer, in which language
    user_id: int  # for /forget
    accepted_at: float  # time.monotonic()
    missing_since: float | None = None

    @property
    def request_id(self) -> str:
        return self.envelope.request_id


class PendingRequests:
    def __init__(self, settings: ServiceSettings, store: Store):
        self.settings = settings
        self.store = store
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
        for request, (done, queued) in zip(requests, states, strict=True):
            if done or now - request.accepted_at > self.settings.BLOB_TTL_S + self.settings.lost_grace_s:
                self._requests.pop(request.request_id, None)
            elif queued:
                request.missing_since = None
            elif request.missing_since is None:
                request.missing_since = now
            elif now - request.missing_since >= self.settings.lost_grace_s:
                lost.append(request)
        told: list[str] = []
        for request in lost:
            self._requests.pop(request.request_id, None)
            if not await self.store.claim_lost(request.request_id):
                continue  # a worker is delivering it, or has: nothing to say
            logger.warning("request %s was lost (its image and task are gone); asking to resend", request.request_id)
            if await self._tell(bot, request):
                told.append(request.request_id)
        return told

    async def _tell(self, bot: Bot, pending: PendingRequest) -> bool:
        request = pending.envelope
        text = texts.lost(request.language)
        if request.ack_message_id is not None:
            try:
                await bot.edit_message_text(text, chat_id=request.chat_id, message_id=request.ack_message_id)
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
