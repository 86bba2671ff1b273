"""The request envelope: who asked and where the answer goes, defined once.

The bot creates it when it accepts an image, keeps it in its pending list, and sends it as the one
JSON field ``envelope`` of the ``diagnose`` task; ``diagnose`` hands the same envelope to ``deliver``.
JSON only (Celery refuses pickle); the image itself stays in Redis under ``blob_key``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str  # random (secrets.token_urlsafe), never derived from the user
    blob_key: str  # Redis key of the image bytes
    chat_id: int
    reply_to_message_id: int | None  # the user's message with the image
    language: str  # en / ru / kk: the language of the answer
    ack_message_id: int | None = None  # "Received, analysing…", replaced by the answer

    def to_json(self) -> dict:
        return self.model_dump(mode="json")
