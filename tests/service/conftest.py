"""Fixtures for the service tests: Redis database, fake Bot API, bot runner, worker processes."""

from __future__ import annotations

import os

import pytest

from .fake_telegram import FakeTelegram
from .harness import BotRunner, WorkerProcess, claim_redis_db, delete_service_keys, release_redis_db, service_settings

TOKEN = "123456:TEST-TOKEN"
# Requests per fault-injection test (tests/service/test_faults.py, test_worker_kill.py,
# test_redis_restart.py): small in CI, raise it locally, e.g. XSO_FAULT_REQUESTS=50.
FAULT_REQUESTS = int(os.environ.get("XSO_FAULT_REQUESTS", "4"))


@pytest.fixture(scope="session")
def redis_db():
    """(url, client) of a Redis database owned by this test session; skipped when Redis is absent."""
    try:
        url, client = claim_redis_db()
    except Exception as error:  # no Redis on this machine
        pytest.skip(f"Redis is not reachable at 127.0.0.1:6379 ({error})")
    yield url, client
    release_redis_db(client)


@pytest.fixture
def redis_client(redis_db):
    """The session's Redis client, with the service's keys deleted before and after the test."""
    _, client = redis_db
    delete_service_keys(client)
    yield client
    delete_service_keys(client)


@pytest.fixture(scope="session")
def fake_telegram():
    with FakeTelegram(TOKEN) as fake:
        yield fake


@pytest.fixture
def fake(fake_telegram):
    fake_telegram.reset()
    yield fake_telegram
    fake_telegram.reset()


@pytest.fixture
def make_settings(fake_telegram, redis_db):
    """``make_settings(**overrides)`` → Settings pointing at the fake and the session's Redis database."""

    def make(**overrides):
        return service_settings(fake_telegram.url, TOKEN, redis_db[0], **overrides)

    return make


@pytest.fixture
def start_bot(make_settings, redis_client, fake):
    """``with start_bot(**settings_overrides):`` runs the real bot against the fake."""

    def start(**overrides):
        return BotRunner(make_settings(**overrides))

    return start


def worker_env(fake_url: str, redis_url: str, models_dir) -> dict[str, str]:
    return {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_API_URL": fake_url,
        "REDIS_URL": redis_url,
        "MODELS_DIR": str(models_dir),
        "DEVICE": "cpu",
        "BACKEND": "openvino-bf16",  # what the CPU deployments run (.env.example, docker-compose.yml)
        "TORCH_THREADS": "2",
        "LOG_LEVEL": "INFO",
    }


def start_worker(fake_telegram, redis_db, models_dir, log_dir) -> WorkerProcess:
    return WorkerProcess(worker_env(fake_telegram.url, redis_db[0], models_dir), log_dir / "worker.log").start()
