"""Service configuration (bot, workers, Flower) from environment variables or ``.env``.

Two classes: ``ServiceSettings`` holds everything a process on the Redis side needs and has no
secret without a default, so Flower and ``celery inspect`` start without the bot token;
``Settings`` adds the Telegram token, which is required (no default) for the bot and the workers.

Also here: the queue and task names and the Redis key layout, the contract the bot and the
workers must agree on without importing each other (the bot never imports ``worker`` or torch).
No torch, no Telegram and no Redis imports in this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Celery names shared by the bot (send_task by name) and the workers.
INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"
DIAGNOSE_TASK = "diagnose"
DELIVER_TASK = "deliver"

TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # bots may download at most 20 MB per file


class ServiceSettings(BaseSettings):
    """Redis, limits, models and time limits. UPPER_CASE names are the environment variables."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    TELEGRAM_API_URL: str = "https://api.telegram.org"
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    CELERY_BROKER_URL: str | None = None  # defaults to REDIS_URL
    KEY_PREFIX: str = "xso:"  # every key the service writes (not Celery's) starts with this

    # Access: empty = everybody. Comma-separated ids ("123,456") or a JSON list.
    ALLOWED_USER_IDS: Annotated[frozenset[int], NoDecode] = frozenset()
    ALLOWED_CHAT_IDS: Annotated[frozenset[int], NoDecode] = frozenset()
    RATE_LIMIT_IMAGES: int = Field(10, ge=1)
    RATE_LIMIT_WINDOW_S: int = Field(600, ge=1)

    BLOB_TTL_S: int = Field(3600, ge=30, le=3600)  # image and overlay bytes: at most one hour
    LANGUAGE_TTL_S: int = Field(365 * 24 * 3600, ge=60)  # remembered /language choice, refreshed on use
    MARK_TTL_S: int = Field(24 * 3600, ge=60)  # "reply sent" marks (idempotent delivery)

    MODELS_DIR: Path = Path("models")
    DEVICE: str = "cpu"  # "cpu", "cuda", "cuda:1"
    TORCH_THREADS: int | None = Field(None, ge=1)
    # "onnx" (ONNX Runtime, CPU; exported from the weights at start, cached by hash), "torch" (CPU or
    # CUDA: channels_last, bf16 autocast on CUDA) or "eager" (naive fp32, the benchmark's baseline).
    BACKEND: Literal["onnx", "torch", "eager"] = "onnx"
    HEATMAP: Literal["cam", "gradcam"] = "cam"  # cam = Grad-CAM from the forward pass (identical here)
    # Body part → model folder (name under MODELS_DIR or absolute), e.g. {"chest": "chest_xrv"}.
    ABNORMALITY_MODELS: dict[str, str] = Field(default_factory=dict)
    # Micro-batching for threaded GPU workers (--pool threads): up to BATCH_MAX images or BATCH_WAIT_MS.
    BATCH_MAX: int = Field(1, ge=1, le=256)
    BATCH_WAIT_MS: float = Field(10.0, ge=0, le=1000)
    METRICS_PORT: int | None = Field(None, ge=1, le=65535)  # Prometheus /metrics of this process

    # Celery time limits (seconds). The broker's visibility timeout is derived from them.
    DIAGNOSE_SOFT_TIME_LIMIT_S: int = Field(90, ge=1)
    DIAGNOSE_TIME_LIMIT_S: int = Field(120, ge=2)
    DELIVER_SOFT_TIME_LIMIT_S: int = Field(60, ge=1)
    DELIVER_TIME_LIMIT_S: int = Field(90, ge=2)
    MAX_ATTEMPTS: int = Field(3, ge=1)  # diagnose attempts (incl. redeliveries) before the apology
    DELIVER_MAX_RETRIES: int = Field(8, ge=0)
    MAX_RETRY_DELAY_S: int = Field(120, ge=1)  # cap on one countdown (429 retry_after, backoff)

    POLL_TIMEOUT_S: int = Field(30, ge=0)  # getUpdates long-poll timeout of `python -m bot`
    PENDING_CHECK_S: float = Field(5.0, gt=0)  # how often the bot looks for accepted requests that were lost
    HEARTBEAT_FILE: Path | None = None  # the bot touches it while healthy (container health check)
    LOG_LEVEL: str = "INFO"

    @field_validator("ALLOWED_USER_IDS", "ALLOWED_CHAT_IDS", mode="before")
    @classmethod
    def _id_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return frozenset(int(item) for item in json.loads(text))
            return frozenset(int(item) for item in text.replace(";", ",").replace(" ", ",").split(",") if item)
        return value

    @field_validator("HEARTBEAT_FILE", "TORCH_THREADS", "CELERY_BROKER_URL", "METRICS_PORT", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("TELEGRAM_API_URL")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _limits(self) -> ServiceSettings:
        if self.DIAGNOSE_SOFT_TIME_LIMIT_S >= self.DIAGNOSE_TIME_LIMIT_S:
            raise ValueError("DIAGNOSE_SOFT_TIME_LIMIT_S must be below DIAGNOSE_TIME_LIMIT_S")
        if self.DELIVER_SOFT_TIME_LIMIT_S >= self.DELIVER_TIME_LIMIT_S:
            raise ValueError("DELIVER_SOFT_TIME_LIMIT_S must be below DELIVER_TIME_LIMIT_S")
        return self

    @property
    def broker_url(self) -> str:
        return self.CELERY_BROKER_URL or self.REDIS_URL

    @property
    def visibility_timeout_s(self) -> int:
        """Redis broker: when an unacknowledged task is handed to another worker (GUIDE §3).

        Just above the longest time a message is legitimately unacknowledged: a retry countdown
        (the worker holds ETA messages unacked) plus the task's hard time limit.
        """
        return max(self.DIAGNOSE_TIME_LIMIT_S, self.DELIVER_TIME_LIMIT_S) + self.MAX_RETRY_DELAY_S + 10

    @property
    def lost_grace_s(self) -> int:
        """How long the bot waits before calling a request lost whose image is gone but which was not
        answered: time for an analysis that read the image just before to finish and deliver."""
        return self.DIAGNOSE_TIME_LIMIT_S + self.DELIVER_TIME_LIMIT_S

    @property
    def api_base_url(self) -> str:
        return f"{self.TELEGRAM_API_URL}/bot"

    @property
    def file_base_url(self) -> str:
        return f"{self.TELEGRAM_API_URL}/file/bot"

    @property
    def keys(self) -> Keys:
        return Keys(self.KEY_PREFIX)

    def allowed(self, user_id: int | None, chat_id: int | None) -> bool:
        """No allowlist configured → everybody; otherwise the user or the chat must be listed."""
        if not self.ALLOWED_USER_IDS and not self.ALLOWED_CHAT_IDS:
            return True
        return (user_id is not None and user_id in self.ALLOWED_USER_IDS) or (
            chat_id is not None and chat_id in self.ALLOWED_CHAT_IDS
        )


class Settings(ServiceSettings):
    """Everything, including the bot token (required: no default)."""

    TELEGRAM_BOT_TOKEN: SecretStr

    @field_validator("TELEGRAM_BOT_TOKEN")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        import re

        if not re.fullmatch(r"\d+:[\w-]+", value.get_secret_value().strip()):
            raise ValueError("TELEGRAM_BOT_TOKEN must look like 123456:ABC-DEF… (from @BotFather)")
        return SecretStr(value.get_secret_value().strip())


class Keys:
    """Redis key layout. ``request`` ids are random (``secrets.token_urlsafe``), never derived from users.

    Per user: ``lang:<uid>`` (language choice), ``rate:<uid>`` (timestamps of recent images),
    ``rate-notice:<uid>``, ``requests:<uid>`` (ids of the user's requests in flight, so /forget can
    delete their blobs). Per request: ``blob:<id>`` (image bytes), ``overlay:<id>`` (PNG),
    ``sent:<id>:<part>`` (delivery marks), ``attempts:<id>``, ``lock:<id>``, ``done:<id>``.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def language(self, user_id: int) -> str:
        return f"{self.prefix}lang:{user_id}"

    def rate(self, user_id: int) -> str:
        return f"{self.prefix}rate:{user_id}"

    def rate_notice(self, user_id: int) -> str:
        return f"{self.prefix}rate-notice:{user_id}"

    def user_requests(self, user_id: int) -> str:
        return f"{self.prefix}requests:{user_id}"

    def blob(self, request_id: str) -> str:
        return f"{self.prefix}blob:{request_id}"

    def overlay(self, request_id: str) -> str:
        return f"{self.prefix}overlay:{request_id}"

    def sent(self, request_id: str, part: str) -> str:
        return f"{self.prefix}sent:{request_id}:{part}"

    def attempts(self, request_id: str) -> str:
        return f"{self.prefix}attempts:{request_id}"

    def lock(self, request_id: str) -> str:
        return f"{self.prefix}lock:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.prefix}done:{request_id}"

    def request_keys(self, request_id: str) -> list[str]:
        """Every per-request key except the delivery marks (use ``sent_pattern`` for those)."""
        return [
            self.blob(request_id),
            self.overlay(request_id),
            self.attempts(request_id),
            self.lock(request_id),
            self.done(request_id),
        ]

    def sent_pattern(self, request_id: str) -> str:
        return f"{self.prefix}sent:{request_id}:*"
