"""Webhook mode (``BOT_MODE=webhook``): the real ``python -m bot`` behind a pretend TLS proxy on loopback.

The bot registers its public URL and secret with Telegram (``setWebhook`` on the fake API), then
listens on 127.0.0.1. Updates POSTed without Telegram's secret header, or with a wrong one, are
refused (403) and never handled; with the right one they go through the same durable intake as
long polling: stored in Redis before the bot answers 200, so a bot SIGKILLed right after answering
still handles them when it comes back.
"""

from __future__ import annotations

import itertools
import time

import httpx
import pytest

from bot.inflight import message_request_id

from .conftest import TOKEN
from .harness import BotProcess, chat_summary, free_port, sample_image

pytestmark = pytest.mark.slow

SECRET = "webhook-secret_123"
PUBLIC_URL = "https://bot.example.org/telegram-hook"
UPDATE_IDS = itertools.count(900_000)


def webhook_env(fake, redis_url: str, port: int) -> dict[str, str]:
    return {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": fake.url, "REDIS_URL": redis_url,
            "BOT_MODE": "webhook", "WEBHOOK_URL": PUBLIC_URL, "WEBHOOK_LISTEN": "127.0.0.1",
            "WEBHOOK_PORT": str(port), "WEBHOOK_SECRET_TOKEN": SECRET}


def start(fake, env: dict[str, str], log, port: int) -> BotProcess:
    """The bot is ready when it has registered the webhook and its port accepts connections."""
    started = time.monotonic()
    bot = BotProcess(env, log).start(fake, ready=lambda: any(c.at >= started for c in fake.calls_of("setWebhook")))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return bot
        except httpx.TransportError:
            time.sleep(0.1)
    bot.stop()
    raise RuntimeError("the webhook port never opened")


def post(port: int, update: dict, secret: str | None) -> int:
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
    return httpx.post(f"http://127.0.0.1:{port}/telegram-hook", json=update, headers=headers, timeout=10).status_code


def text_update(fake, user: int, text: str) -> dict:
    fields = {"text": text}
    if text.startswith("/"):
        fields["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return {"update_id": next(UPDATE_IDS), "message": fake._message(user, None, "en", **fields)}


def photo_update(fake, user: int, data: bytes) -> dict:
    file_id, unique_id = fake.add_file(data, "photos/photo.jpg")
    photo = [{"file_id": file_id, "file_unique_id": unique_id, "width": 1280, "height": 1280, "file_size": len(data)}]
    return {"update_id": next(UPDATE_IDS), "message": fake._message(user, None, "en", photo=photo)}


def test_webhook_checks_the_secret_and_handles_updates(fake, redis_db, redis_client, tmp_path):
    port = free_port()
    bot = start(fake, webhook_env(fake, redis_db[0], port), tmp_path / "bot.log", port)
    try:
        (registered,) = fake.calls_of("setWebhook")
        assert registered.params["url"] == PUBLIC_URL and registered.params["secret_token"] == SECRET
        assert post(port, text_update(fake, 2101, "/start"), secret=None) == 403
        assert post(port, text_update(fake, 2102, "/start"), secret="wrong") == 403
        assert post(port, text_update(fake, 2103, "/start"), secret=SECRET) == 200
        fake.wait_for(lambda: fake.texts_to(2103), timeout=20)
        time.sleep(1.0)
    finally:
        bot.stop()
    assert not fake.texts_to(2101) and not fake.texts_to(2102)  # refused updates are never handled
    assert len(fake.texts_to(2103)) == 1 and "second opinion" in fake.texts_to(2103)[0]
    assert not fake.calls_of("getUpdates")  # no polling in webhook mode
    assert redis_client.xlen("xso:intake") == 0  # handled, acknowledged, deleted


def test_webhook_updates_answered_200_survive_a_sigkill(fake, redis_db, redis_client, tmp_path):
    port = free_port()
    env = webhook_env(fake, redis_db[0], port)
    users = [2200 + i for i in range(5)]
    first = start(fake, env, tmp_path / "bot-1.log", port)
    try:
        statuses = [post(port, photo_update(fake, user, sample_image("chest")), secret=SECRET) for user in users]
        first.kill()  # right after Telegram was told "200": it will not send these again
    finally:
        first.stop()
    assert statuses == [200] * len(users)
    second = start(fake, env, tmp_path / "bot-2.log", port)
    try:
        # No worker runs here: the inference queue shows each image was taken in and enqueued.
        fake.wait_for(lambda: redis_client.llen("inference") >= len(users), timeout=30)
        fake.wait_for(lambda: redis_client.xlen("xso:intake") == 0, timeout=10)
        time.sleep(1.0)
    finally:
        second.stop()
    for user in users:
        # At most one acknowledgement: a run killed while sending one may have sent it, so the next
        # run never sends a second (the reply itself still comes, from the worker).
        assert chat_summary(fake, user).acks <= 1, (user, chat_summary(fake, user))
    assert sum(chat_summary(fake, u).acks for u in users) >= 1
    # Each image enqueued under one request id. A bot killed between enqueueing and noting it may
    # enqueue that image again on the next run, under the same id (answered once: the delivery marks).
    request_ids = [message_request_id(raw) for raw in redis_client.lrange("inference", 0, -1)]
    assert len(set(request_ids)) == len(users) and len(request_ids) <= len(users) + 1, request_ids
