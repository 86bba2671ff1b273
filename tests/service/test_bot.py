"""The real bot against the fake Bot API and a real Redis; no worker runs here (tasks stay queued)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from contract.i18n import LANGUAGES
from contract.keys import INFERENCE_QUEUE

from .conftest import TOKEN
from .harness import ROOT, sample_image

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
PLACEHOLDER = b"{}"  # stands for a request already waiting in the queue


@pytest.fixture(autouse=True)
def _empty_inference_queue(redis_db):
    """Tasks enqueued here are never consumed: drop them so no later worker answers them."""
    client = redis_db[1]
    client.delete(INFERENCE_QUEUE)
    yield
    client.delete(INFERENCE_QUEUE)


def queued_tasks(client) -> list[dict]:
    """Decode the Celery messages waiting in the inference queue (kombu's JSON envelope)."""
    messages = []
    for raw in client.lrange(INFERENCE_QUEUE, 0, -1):
        if raw == PLACEHOLDER:
            continue
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"
        body = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "args": body[0], "kwargs": body[1]})
    return messages


def test_start_help_privacy_and_command_menu(start_bot, fake):
    with start_bot():
        fake.wait_for(lambda: len(fake.calls_of("setMyCommands")) == len(LANGUAGES))
        languages = sorted(str(c.params.get("language_code")) for c in fake.calls_of("setMyCommands"))
        assert languages == sorted(["None", *(set(LANGUAGES) - {"en"})])
        for command in ("/start", "/help", "/privacy"):
            fake.inject_text(501, command)
        texts = fake.wait_for(lambda: len(fake.texts_to(501)) == 3 and fake.texts_to(501))
    start, help_text, privacy = sorted(texts, key=lambda t: ("second opinion" not in t, "How to use" not in t))
    assert "second opinion" in start and "not make a diagnosis" in start and "/privacy" in start
    assert "So far I can only analyse X-rays of the chest." in start  # from models/chest/card.json
    assert "How to use" in help_text and "10 images per 10 minutes" in help_text
    assert "cloud chats" in privacy and "at most one hour" in privacy and "/forget" in privacy


def test_unsupported_messages_get_a_hint(start_bot, fake):
    user = 502
    with start_bot():
        fake.inject_text(user, "hello, is my lung fine?")
        fake.inject_message(user, sticker={"file_id": "S", "file_unique_id": "S", "type": "regular", "width": 512,
                                           "height": 512, "is_animated": False, "is_video": False})
        fake.inject_message(user, video={"file_id": "V", "file_unique_id": "V", "width": 640, "height": 480,
                                         "duration": 3})
        fake.inject_message(user, voice={"file_id": "A", "file_unique_id": "A", "duration": 2})
        fake.inject_document(user, b"%PDF-1.4", file_name="report.pdf", mime_type="application/pdf")
        fake.inject_document(user, b"\xff\xd8 big", file_name="huge.tiff", mime_type="image/tiff",
                             file_size=25 * 1024 * 1024)
        fake.inject_text(user, "/nosuchcommand")
        texts = fake.wait_for(lambda: len(fake.texts_to(user)) == 7 and fake.texts_to(user))
    assert sum("X-ray images only" in t for t in texts) == 5  # text, sticker, video, voice, unknown command
    assert sum("cannot analyse this type of file" in t for t in texts) == 1
    assert sum("larger than 20 MB" in t for t in texts) == 1
    assert not fake.calls_of("getFile")


def test_photo_is_acknowledged_stored_and_enqueued_with_json_args(start_bot, fake, redis_client):
    user = 503
    redis_client.rpush(INFERENCE_QUEUE, PLACEHOLDER, PLACEHOLDER)  # two requests already waiting
    with start_bot():
        message = fake.inject_photo(user, CHEST, forwarded=True)
        fake.wait_for(lambda: len(queued_tasks(redis_client)) == 1)
    ack = fake.calls_of("sendMessage", user)[0]
    assert ack.params["text"].startswith("Received, analysing…")
    assert "2 images are ahead of yours in the queue." in ack.params["text"]
    assert ack.params["reply_parameters"]["message_id"] == message["message_id"]
    assert fake.calls_of("sendChatAction", user)
    # the largest size, photo[-1], is downloaded; the thumbnail photo[0] is not
    assert [c.params["file_id"] for c in fake.calls_of("getFile")] == [message["photo"][-1]["file_id"]]

    task = queued_tasks(redis_client)[0]
    assert task["task"] == "diagnose" and task["args"] == []
    assert set(task["kwargs"]) == {"envelope"}  # the request envelope, one JSON field
    kwargs = task["kwargs"]["envelope"]
    assert set(kwargs) == {"request_id", "blob_key", "chat_id", "reply_to_message_id", "language", "ack_message_id",
                           "mode", "channel", "callback_url", "client"}
    assert kwargs["channel"] == "telegram" and kwargs["callback_url"] is None and kwargs["client"] is None
    assert kwargs["mode"] == "screening"  # no /mode choice: the default
    assert kwargs["chat_id"] == user and kwargs["reply_to_message_id"] == message["message_id"]
    assert kwargs["language"] == "en"
    assert kwargs["ack_message_id"] == ack.result["message_id"]
    assert redis_client.get(kwargs["blob_key"]) == CHEST
    ttl = redis_client.ttl(kwargs["blob_key"])
    assert 0 < ttl <= 3600
    assert kwargs["request_id"] in kwargs["blob_key"] and str(user) not in kwargs["blob_key"]



def test_language_menu_is_remembered_and_telegram_language_is_the_default(start_bot, fake, redis_client):
    user = 504
    with start_bot():
        fake.inject_text(user, "/start", language_code="ru")  # no choice yet: Telegram's language_code
        fake.wait_for(lambda: fake.texts_to(user))
        assert fake.texts_to(user)[0].startswith("Здравствуйте!")

        fake.inject_text(user, "/language", language_code="ru")
        fake.wait_for(lambda: len(fake.calls_of("sendMessage", user)) == 2)
        menu = fake.calls_of("sendMessage", user)[1]
        rows = menu.params["reply_markup"]["inline_keyboard"]
        assert all(len(row) <= 3 for row in rows)  # every language, three a row, each in its own name
        buttons = [button for row in rows for button in row]
        assert [b["callback_data"] for b in buttons] == [f"lang:{code}" for code in LANGUAGES]
        assert [b["text"] for b in buttons][:3] == ["English", "Русский", "Қазақша"]
        assert {"فارسی", "العربية", "O‘zbekcha", "Español", "Português"} <= {b["text"] for b in buttons}

        fake.inject_callback(user, "lang:kk", menu.result, language_code="ru")
        edited = fake.wait_for(lambda: fake.calls_of("editMessageText", user))
        assert edited[0].params["text"] == "Дайын: енді қазақ тілінде жауап беремін."
        assert fake.calls_of("answerCallbackQuery")
        assert redis_client.get(f"xso:lang:{user}") == b"kk"

        fake.inject_text(user, "/help", language_code="ru")  # the choice beats language_code
        fake.wait_for(lambda: len(fake.texts_to(user)) == 3)
    assert fake.texts_to(user)[2].startswith("Ботты қалай пайдалану керек")


def test_rate_limit_says_when_to_retry_and_how_many_were_accepted(start_bot, fake, redis_client):
    user = 505

    def notices(method: str) -> list[str]:
        return [str(c.params.get("text", "")) for c in fake.calls_of(method, user) if "try again" in
                str(c.params.get("text", ""))]

    def acknowledgements() -> list[str]:
        calls = sorted(fake.calls_of("sendMessage", user) + fake.calls_of("editMessageText", user),
                       key=lambda c: c.at)
        return [t for t in (str(c.params.get("text", "")) for c in calls) if t.startswith("Received")]

    with start_bot(RATE_LIMIT_IMAGES=2, RATE_LIMIT_WINDOW_S=600):
        for _ in range(4):
            fake.inject_photo(user, CHEST)
        # One notice per burst; a later refusal of the same burst edits it (or it is sent with both).
        fake.wait_for(lambda: len(queued_tasks(redis_client)) == 2 and [
            t for t in notices("sendMessage") + notices("editMessageText") if "2 images were not accepted" in t])
        # The acknowledgement waits for the chat's next send slot, which the notice may have taken, and
        # covers the images that joined by then ("Received, analysing…" then an edit, or "Received 2
        # images…" at once on a loaded machine): wait until it shows both accepted images.
        fake.wait_for(lambda: acknowledgements()[-1:] == ["Received 2 images, analysing…"])
        time.sleep(0.3)
    texts = fake.texts_to(user)
    # One acknowledgement for the burst (sent once, perhaps edited); the two accepted images are the
    # two downloaded and queued.
    assert sum(t.startswith("Received") for t in texts) == 1
    assert acknowledgements()[-1] == "Received 2 images, analysing…"
    sent = notices("sendMessage")
    assert len(sent) == 1
    final = (sent + notices("editMessageText"))[-1]
    assert final == ("You have sent many images in a short time. Please try again in 10 minutes.\n"
                     "2 images were accepted for analysis.\n"
                     "2 images were not accepted; please send them again then.")
    assert len(fake.calls_of("getFile")) == 2


def test_allowlist_refuses_others_but_privacy_and_forget_stay_open(start_bot, fake):
    allowed, stranger, group = 506, 507, -100500
    with start_bot(ALLOWED_USER_IDS="506", ALLOWED_CHAT_IDS=str(group)):
        fake.inject_photo(stranger, CHEST)
        fake.inject_text(stranger, "/start")
        fake.inject_text(stranger, "/privacy")
        fake.inject_text(allowed, "/start")
        fake.inject_text(508, "/help", chat_id=group)  # anyone inside an allowed chat
        fake.wait_for(lambda: len(fake.texts_to(stranger)) == 3 and fake.texts_to(allowed) and fake.texts_to(group))
    refusals = [t for t in fake.texts_to(stranger) if "approved users only" in t]
    assert len(refusals) == 2 and all(f"user id is {stranger}" in t for t in refusals)
    assert any("cloud chats" in t for t in fake.texts_to(stranger))
    assert not fake.calls_of("getFile")
    assert "second opinion" in fake.texts_to(allowed)[0]
    assert "How to use" in fake.texts_to(group)[0]


def test_mode_is_remembered_per_chat_and_travels_with_the_request(start_bot, fake, redis_client):
    user = 512
    with start_bot():
        fake.inject_text(user, "/mode clinician")
        fake.wait_for(lambda: redis_client.get(f"xso:mode:{user}") == b"clinician")
        fake.wait_for(lambda: fake.texts_to(user))
        assert "now in clinician mode" in fake.texts_to(user)[0] and "Screening (default)" in fake.texts_to(user)[0]
        assert 0 < redis_client.ttl(f"xso:mode:{user}") <= 30 * 24 * 3600
        fake.inject_photo(user, CHEST)
        fake.wait_for(lambda: len(queued_tasks(redis_client)) == 1)
        assert queued_tasks(redis_client)[0]["kwargs"]["envelope"]["mode"] == "clinician"
        fake.inject_text(user, "/mode")  # no argument: switch to the other mode
        fake.wait_for(lambda: redis_client.get(f"xso:mode:{user}") == b"screening")
        fake.inject_text(user, "/mode banana")
        fake.wait_for(lambda: any("Unknown mode" in t for t in fake.texts_to(user)))
    assert redis_client.get(f"xso:mode:{user}") == b"screening"


def test_forget_removes_every_key_of_the_user(start_bot, fake, redis_client):
    user, other = 509, 510
    with start_bot():
        fake.inject_text(user, "/mode clinician")
        fake.wait_for(lambda: redis_client.exists(f"xso:mode:{user}") and fake.calls_of("sendMessage", user))
        fake.inject_text(user, "/language")
        menu = fake.wait_for(lambda: fake.calls_of("sendMessage", user)[1:])[0]
        fake.inject_callback(user, "lang:ru", menu.result)
        fake.wait_for(lambda: redis_client.get(f"xso:lang:{user}") == b"ru")
        fake.inject_photo(user, CHEST)  # no worker runs: the image stays in Redis, "in flight"
        fake.inject_photo(other, CHEST)
        fake.wait_for(lambda: len(queued_tasks(redis_client)) == 2)
        blob_keys = {t["kwargs"]["envelope"]["chat_id"]: t["kwargs"]["envelope"]["blob_key"]
                     for t in queued_tasks(redis_client)}
        assert redis_client.exists(blob_keys[user]) and redis_client.exists(f"xso:rate:{user}")

        fake.inject_text(user, "/forget")
        fake.wait_for(lambda: any("Готово: всё" in t for t in fake.texts_to(user)))
    # The send-pacing slot of the chat (contract.pacing) and the bot's claim on the next one (while an
    # acknowledgement still waits for it) are the only keys left: they expire within ~3 s.
    remaining = [k.decode() for k in redis_client.scan_iter("xso:*") if str(user).encode() in k]
    pacing = {f"xso:pace:chat:{user}", f"xso:pace:wanted:{user}"}
    assert set(remaining) <= pacing and all(redis_client.pttl(k) <= 3000 for k in pacing)
    fake.wait_for(lambda: not [k for k in redis_client.scan_iter("xso:*") if str(user).encode() in k], timeout=5)
    assert not redis_client.exists(blob_keys[user])
    assert redis_client.exists(blob_keys[other]) and redis_client.exists(f"xso:rate:{other}")


def test_download_failure_and_broker_failure_are_never_silent(start_bot, fake, redis_client):
    user = 511
    with start_bot():
        fake.inject_message(user, photo=[{"file_id": "GONE", "file_unique_id": "GONE", "width": 9, "height": 9}])
        fake.wait_for(lambda: fake.calls_of("editMessageText", user))
    assert "could not download" in fake.calls_of("editMessageText", user)[0].params["text"]
    assert not redis_client.exists(f"xso:rate:{user}") or redis_client.zcard(f"xso:rate:{user}") == 0

    fake.reset()
    with start_bot(CELERY_BROKER_URL="redis://127.0.0.1:1/0"):  # nothing listens there
        fake.inject_photo(user, CHEST)
        fake.wait_for(lambda: fake.calls_of("editMessageText", user), timeout=60)
    assert "service is unavailable" in fake.calls_of("editMessageText", user)[0].params["text"]
    assert not list(redis_client.scan_iter("xso:blob:*"))  # the stored image was dropped again


def test_python_m_bot_starts_polling_and_stops_on_sigterm(fake, redis_db):
    env = {**os.environ, "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": fake.url, "REDIS_URL": redis_db[0],
           "POLL_TIMEOUT_S": "1", "HEARTBEAT_FILE": "", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "bot"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        fake.wait_for(lambda: fake.calls_of("getUpdates"), timeout=30)
        fake.inject_text(512, "/start")
        fake.wait_for(lambda: fake.texts_to(512), timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode(errors="replace")
    assert process.returncode == 0, output
    assert TOKEN not in output  # httpx request logging (with the token in the URL) is silenced


def test_importing_the_bot_does_not_load_torch_or_the_worker():
    """The bot reads model cards and reply sentences (diagnosis.cards, .messages and what they import, all
    torch- and numpy-free) and nothing else of diagnosis: no models, no intake, no pipeline."""
    light = "('diagnosis', 'diagnosis.cards', 'diagnosis.config', 'diagnosis.messages', 'diagnosis.report')"
    code = "import sys, bot.app, bot.__main__, bot.access, bot.commands, bot.images, bot.dispatch; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', 'PIL', 'worker') " \
           f"or m.startswith('diagnosis') and m not in {light}]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "TELEGRAM_BOT_TOKEN": "x"})


def test_heartbeat_feeds_the_container_health_check(start_bot, fake, tmp_path):
    heartbeat = tmp_path / "heartbeat"
    env = {**os.environ, "HEARTBEAT_FILE": str(heartbeat)}
    check = [sys.executable, "-m", "bot.healthcheck"]
    assert subprocess.run(check, cwd=ROOT, env=env, capture_output=True).returncode == 1  # not started yet
    with start_bot(HEARTBEAT_FILE=heartbeat):
        fake.wait_for(heartbeat.exists, timeout=10)
    assert subprocess.run(check, cwd=ROOT, env=env, capture_output=True).returncode == 0
