"""Service configuration (bot, workers, Flower) from environment variables or ``.env``.

Two classes: ``ServiceSettings`` holds everything a process on the Redis side needs and has no
secret without a default, so Flower and ``celery inspect`` start without the bot token;
``Settings`` adds the Telegram token, which is required (no default) for the bot and the workers.
Each process builds one settings object. Queue/task names and the Redis key layout live in
``contract.keys``. No torch, no Telegram and no Redis imports in this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .keys import Keys

# How the networks run (diagnosis.backends) and how heatmaps are made (diagnosis.heatmap): the one
# list of each, imported by the pipeline configuration, the CLI and training.
Backend = Literal["torch", "onnx", "openvino", "openvino-bf16", "eager"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Heatmap = Literal["cam", "gradcam"]
HEATMAPS: tuple[str, ...] = get_args(Heatmap)

# Retry countdowns up to this stay with Celery (an ETA message, held unacknowledged by the worker);
# longer ones are parked in Redis (worker.scheduler). Part of the visibility timeout below.
CELERY_COUNTDOWN_MAX_S = 5.0

UID_ROOT_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.")
UID_ROOT_MAX = 40  # leaves room for the generated suffix within the 64 characters of a DICOM UID


def check_uid_root(root: str | None) -> str | None:
    """DICOM_UID_ROOT: None/"" → None (``2.25.`` UUID-derived UIDs); else digits and dots ending in "."."""
    if not root:
        return None
    if len(root) > UID_ROOT_MAX or not UID_ROOT_PATTERN.fullmatch(root):
        raise ValueError(f"DICOM_UID_ROOT must be digits and dots, end with '.', and be at most {UID_ROOT_MAX} "
                         f"characters (e.g. '1.2.826.0.1.3680043.10.1234.'), got {root!r}")
    return root


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
    MODE_TTL_S: int = Field(30 * 24 * 3600, ge=60)  # remembered /mode choice per chat, refreshed on use
    MARK_TTL_S: int = Field(24 * 3600, ge=60)  # "reply sent" marks (idempotent delivery)

    # Inference workers. Unset (or empty) = the default of ``diagnosis.config.PipelineConfig``, the one
    # place the defaults live: models from the repository's models/ folder (found from the installed
    # package, not the working directory), backend "torch", device "cpu", heatmap "cam".
    MODELS_DIR: Path | None = None
    DEVICE: str | None = None  # "cpu", "cuda", "cuda:1"
    TORCH_THREADS: int | None = Field(None, ge=1)  # intra-op threads of every backend, per worker process
    # "onnx" (ONNX Runtime, CPU; exported from the weights at start, cached by hash), "openvino"
    # (OpenVINO, CPU, from the same export; compiled blob cached too), "openvino-bf16" (the same at
    # bf16), "torch" (CPU or
    # CUDA: channels_last, bf16 autocast on CUDA) or "eager" (naive fp32, the benchmark's baseline).
    BACKEND: Backend | None = None
    HEATMAP: Heatmap | None = None  # cam = Grad-CAM from the forward pass (identical here)
    # Body part → model folder (name under MODELS_DIR or absolute), e.g. {"chest": "chest_xrv"}.
    ABNORMALITY_MODELS: dict[str, str] = Field(default_factory=dict)
    XRAY_CACHE_DIR: Path | None = None  # ONNX exports (default ~/.cache/xray-second-opinion)
    # Micro-batching for threaded GPU workers (--pool threads): up to BATCH_MAX images or BATCH_WAIT_MS.
    BATCH_MAX: int = Field(1, ge=1, le=256)
    BATCH_WAIT_MS: float = Field(10.0, ge=0, le=1000)
    # Batches in flight at once (diagnosis.batching): 2 on a CPU worker overlaps one batch's decode and
    # overlay with the other's inference; 1 on a GPU worker.
    BATCH_LOOPS: int = Field(1, ge=1, le=8)
    TORCH_COMPILE: bool = False  # BACKEND=torch: torch.compile per fixed batch size (CUDA graphs on CUDA)
    METRICS_PORT: int | None = Field(None, ge=1, le=65535)  # Prometheus /metrics of this process

    # Celery time limits (seconds). The broker's visibility timeout is derived from them, and with it
    # how soon a task whose worker died is run by another: keep them short. Model loading does not
    # count (workers load before they take tasks); one analysis takes well under a second on a CPU,
    # one delivery a few seconds at most (waits for Telegram's limits included).
    DIAGNOSE_SOFT_TIME_LIMIT_S: int = Field(20, ge=1)
    DIAGNOSE_TIME_LIMIT_S: int = Field(30, ge=2)
    DELIVER_SOFT_TIME_LIMIT_S: int = Field(25, ge=1)
    DELIVER_TIME_LIMIT_S: int = Field(30, ge=2)
    MAX_ATTEMPTS: int = Field(3, ge=1)  # diagnose attempts (incl. redeliveries) before the apology
    DELIVER_MAX_RETRIES: int = Field(8, ge=0)
    MAX_RETRY_DELAY_S: int = Field(120, ge=1)  # cap on one countdown (429 retry_after, backoff)

    # Telegram's send limits, shared through Redis by every process that sends (contract.pacing):
    # under Telegram's ~30 messages/s per bot (with room for jitter), ~1/s per chat, ~20/min per group.
    TELEGRAM_MESSAGES_PER_S: float = Field(20.0, gt=0)
    TELEGRAM_CHAT_MESSAGES_PER_S: float = Field(1.0, gt=0)
    TELEGRAM_GROUP_MESSAGES_PER_MIN: float = Field(19.0, gt=0)
    PACE_MAX_WAIT_S: float = Field(3.0, ge=0)  # a longer wait for a send slot reschedules the delivery
    # Bursts (contract.bursts): images of one chat less than ACK_MERGE_S apart share one
    # acknowledgement; a reply waits at most DELIVER_ORDER_WAIT_S for the replies to the chat's
    # earlier images (0: replies are not ordered).
    ACK_MERGE_S: float = Field(5.0, gt=0)
    DELIVER_ORDER_WAIT_S: float = Field(30.0, ge=0)

    # How the bot receives updates: long polling, or a webhook behind the operator's TLS proxy
    # (WEBHOOK_URL is the public https URL the proxy forwards to WEBHOOK_LISTEN:WEBHOOK_PORT, same
    # path; Telegram sends WEBHOOK_SECRET_TOKEN with every update and the bot refuses others).
    BOT_MODE: Literal["polling", "webhook"] = "polling"
    WEBHOOK_URL: str | None = None
    WEBHOOK_LISTEN: str = "127.0.0.1"  # in a container behind a proxy: 0.0.0.0 (deploy/k8s sets it)
    WEBHOOK_PORT: int = Field(8443, ge=1, le=65535)
    WEBHOOK_SECRET_TOKEN: SecretStr | None = None
    # Durable intake (bot.intake): the consumer name (default: the host name, so a restarted bot
    # finds what it had taken) and when a bot takes over updates another consumer left pending.
    INTAKE_CONSUMER: str | None = None
    INTAKE_CLAIM_IDLE_S: float = Field(60.0, gt=0)

    POLL_TIMEOUT_S: int = Field(30, ge=0)  # getUpdates long-poll timeout of `python -m bot`
    PENDING_CHECK_S: float = Field(5.0, gt=0)  # how often the bot looks for accepted requests that were lost
    HEARTBEAT_FILE: Path | None = None  # the bot touches it while healthy (container health check)
    LOG_LEVEL: str = "INFO"
    # Root of the UIDs of DICOM objects this service makes (diagnosis/dicom_out.py: SR, Secondary
    # Captures), e.g. your organisation's registered root "1.2.826.0.1.3680043.10.1234."; unset:
    # "2.25." UUID-derived UIDs. The CLI reads the same variable (xray-diagnose --dicom-out).
    DICOM_UID_ROOT: str | None = None

    # HTTP API (``python -m api``, docs/api.md). Keys live in API_KEYS_FILE (hashed; written by
    # ``python -m api keys create``), not in Redis, which keeps nothing on disk.
    API_HOST: str = "127.0.0.1"  # in a container: 0.0.0.0
    API_PORT: int = Field(8000, ge=1, le=65535)
    API_KEYS_FILE: Path = Path("api-keys.json")
    API_RATE_LIMIT: int = Field(60, ge=1)  # images per key per API_RATE_WINDOW_S
    API_RATE_WINDOW_S: int = Field(60, ge=1)
    API_DAILY_QUOTA: int = Field(1000, ge=1)  # images per key per UTC day
    API_MAX_UPLOAD_BYTES: int = Field(20 * 1024 * 1024, ge=1024, le=20 * 1024 * 1024)  # the pipeline's limit
    # Callbacks: signed with HMAC-SHA256 under a per-key secret derived from this one (printed by
    # ``keys create``); without it, requests with callback_url are refused. http:// targets only
    # when API_CALLBACK_ALLOW_HTTP (tests, a clinic's LAN).
    API_CALLBACK_SECRET: SecretStr | None = None
    API_CALLBACK_ALLOW_HTTP: bool = False
    # callback_url hosts must resolve to public addresses only (no loopback, RFC 1918, link-local such
    # as cloud metadata at 169.254.169.254): set this to allow them (tests, a clinic's LAN).
    API_CALLBACK_ALLOW_PRIVATE: bool = False
    API_CALLBACK_TIMEOUT_S: float = Field(10.0, gt=0, le=60)
    API_CALLBACK_MAX_RETRIES: int = Field(8, ge=0)
    API_PUBLIC_URL: str | None = None  # e.g. https://xray.example.org: absolute URLs in callbacks
    API_WATCHDOG_S: float = Field(5.0, gt=0)  # how often the API looks for accepted requests that were lost

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

    @field_validator("HEARTBEAT_FILE", "TORCH_THREADS", "CELERY_BROKER_URL", "METRICS_PORT", "MODELS_DIR", "DEVICE",
                     "BACKEND", "HEATMAP", "XRAY_CACHE_DIR", "WEBHOOK_URL", "WEBHOOK_SECRET_TOKEN", "INTAKE_CONSUMER",
                     "API_CALLBACK_SECRET", "API_PUBLIC_URL", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("DICOM_UID_ROOT")
    @classmethod
    def _uid_root(cls, value: str | None) -> str | None:
        return check_uid_root(value.strip() if value else None)

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
        """Redis broker: when an unacknowledged task is handed to another worker (its worker died).

        Just above the longest time a message is legitimately unacknowledged: one task run (the hard
        time limit) plus a short Celery countdown (the worker holds an ETA message unacknowledged;
        longer countdowns are parked in Redis by ``worker.scheduler``, not held).
        """
        return max(self.DIAGNOSE_TIME_LIMIT_S, self.DELIVER_TIME_LIMIT_S) + int(CELERY_COUNTDOWN_MAX_S) + 10

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

    def webhook_options(self) -> dict[str, object]:
        """``Application.run_webhook`` arguments for BOT_MODE=webhook; ValueError when incomplete."""
        secret = self.WEBHOOK_SECRET_TOKEN.get_secret_value() if self.WEBHOOK_SECRET_TOKEN else ""
        if not self.WEBHOOK_URL or urlsplit(self.WEBHOOK_URL).scheme != "https":
            raise ValueError("BOT_MODE=webhook needs WEBHOOK_URL, the public https:// URL of your TLS proxy")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise ValueError("BOT_MODE=webhook needs WEBHOOK_SECRET_TOKEN: 1-256 characters A-Z, a-z, 0-9, _ and -")
        return {"listen": self.WEBHOOK_LISTEN, "port": self.WEBHOOK_PORT, "webhook_url": self.WEBHOOK_URL,
                "url_path": urlsplit(self.WEBHOOK_URL).path.lstrip("/"), "secret_token": secret}

    @field_validator("TELEGRAM_BOT_TOKEN")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        if not re.fullmatch(r"\d+:[\w-]+", value.get_secret_value().strip()):
            raise ValueError("TELEGRAM_BOT_TOKEN must look like 123456:ABC-DEF… (from @BotFather)")
        return SecretStr(value.get_secret_value().strip())



def load_settings() -> ServiceSettings:
    """The one settings object of a worker process: ``Settings`` when a bot token is configured;
    without one (or with a malformed one) ``ServiceSettings``, so Flower and ``celery inspect`` start
    without it. Code that talks to Telegram asks for ``Settings`` (see ``worker.resources``)."""
    try:
        return Settings()
    except ValidationError as error:
        if all(issue["loc"][:1] == ("TELEGRAM_BOT_TOKEN",) for issue in error.errors()):
            return ServiceSettings()
        raise
