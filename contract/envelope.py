"""The request envelope: who asked and where the answer goes, defined once.

The bot (or the HTTP API, ``api/``) creates it when it accepts an image, keeps it in its pending list,
and sends it as the one JSON field ``envelope`` of the ``diagnose`` task; ``diagnose`` hands the same
envelope to ``deliver``, which answers on the envelope's ``channel``: a Telegram chat, or (``api``)
the analysis record in Redis that ``GET /v1/analyses/{id}`` reads, plus the client's callback.
JSON only (Celery refuses pickle); the image itself stays in Redis under ``blob_key``.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

Mode = Literal["screening", "clinician"]  # the reply's audience (diagnosis.operating); /mode in the bot
MODES: tuple[str, ...] = get_args(Mode)  # the one list: bot, API, CLI, pipeline and training import it
CHANNELS = ("telegram", "api")  # where the answer goes


class RequestEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str  # random (secrets.token_urlsafe), never derived from the user
    blob_key: str  # Redis key of the image bytes
    chat_id: int
    reply_to_message_id: int | None  # the user's message with the image
    language: str  # a code of contract.i18n.LANGUAGES (en, ru, kk, fa …): the language of the answer
    ack_message_id: int | None = None  # "Received, analysing…", replaced by the answer
    # screening (default, for anyone) or clinician (all findings with their operating points): /mode
    mode: Mode = "screening"
    # telegram: chat_id / reply_to / ack are Telegram's. api: chat_id is 0, the answer is stored for
    # GET /v1/analyses/{request_id} and, with callback_url, POSTed there signed for ``client`` (key name).
    channel: Literal["telegram", "api"] = "telegram"
    callback_url: str | None = None
    client: str | None = None

    def to_json(self) -> dict:
        return self.model_dump(mode="json")
