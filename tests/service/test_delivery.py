"""Delivery in-process against the fake Bot API and a real Redis: exactly once, 429 and 5xx handling."""

from __future__ import annotations

import threading
import time

import pytest

from contract.envelope import RequestEnvelope
from diagnosis.messages import PHYSICIAN, apology
from diagnosis.report import DiagnosisResult, Finding
from worker.deliver import compose_texts, send_reply, split_text
from worker.telegram_out import Deferred, TelegramOut, Undeliverable

from .conftest import TOKEN
from .harness import PrivateRedis, service_settings

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n" + b"overlay" * 10
JPEG = b"\xff\xd8\xff\xe0" + b"overlay" * 10
CHAT = 601


def analysed_result() -> dict:
    findings = [Finding(label="Effusion", probability=0.81, positive=True, threshold=0.5),
                Finding(label="Mass", probability=0.12, positive=False, threshold=0.5)]
    result = DiagnosisResult(outcome="analysed", is_xray=True, xray_probability=0.99, body_part="chest",
                             body_part_probability=0.97, findings=findings, heatmap_labels=["Effusion"])
    return result.model_dump(mode="json")


@pytest.fixture
def telegram(make_settings, fake):
    settings = make_settings()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    out = TelegramOut(settings, sleep=sleep)
    yield out, settings, sleeps
    out.close()


def deliver(redis_client, out, settings, request_id, language="en", **extra):
    keys = settings.keys
    redis_client.set(keys.blob(request_id), b"image bytes", ex=60)
    request = RequestEnvelope(request_id=request_id, chat_id=CHAT, reply_to_message_id=7, language=language,
                              ack_message_id=99, blob_key=keys.blob(request_id))
    arguments = {"result": analysed_result(), **extra}
    return send_reply(redis_client, out, settings, request, **arguments)


def test_delivered_twice_sends_once_then_cleans_up(telegram, fake, redis_client):
    out, settings, _ = telegram
    keys = settings.keys
    redis_client.set(keys.overlay("r1"), PNG, ex=60)
    assert deliver(redis_client, out, settings, "r1", overlay_key=keys.overlay("r1")) == ["text0", "photo"]
    assert deliver(redis_client, out, settings, "r1", overlay_key=keys.overlay("r1")) == []  # redelivered

    texts = fake.texts_to(CHAT)
    assert len(texts) == 1 and texts[0].rstrip().endswith(PHYSICIAN)
    assert "Pleural effusion" in texts[0]
    photos = fake.calls_of("sendPhoto", CHAT)
    assert len(photos) == 1 and photos[0].files["photo"] == PNG
    assert "not a diagnosis" in photos[0].params["caption"]
    for call in (*fake.calls_of("sendMessage", CHAT), *photos):
        assert call.params["reply_parameters"] == {"message_id": 7, "allow_sending_without_reply": True}
    assert [c.params["message_id"] for c in fake.calls_of("deleteMessage", CHAT)] == [99]  # the acknowledgement
    assert not redis_client.exists(keys.blob("r1"), keys.overlay("r1"))
    assert redis_client.exists(keys.done("r1"), keys.sent("r1", "text0"), keys.sent("r1", "photo")) == 3


def test_a_part_accepted_before_a_failure_is_not_sent_again(telegram, fake, redis_client):
    out, settings, sleeps = telegram
    keys = settings.keys
    redis_client.set(keys.overlay("r2"), PNG, ex=60)
    fake.fail_next("sendPhoto", 429, retry_after=30)  # long flood wait: the task must be retried later
    with pytest.raises(Deferred) as deferred:
        deliver(redis_client, out, settings, "r2", overlay_key=keys.overlay("r2"))
    assert deferred.value.delay == 30 and not sleeps
    assert redis_client.exists(keys.sent("r2", "text0")) and not redis_client.exists(keys.sent("r2", "photo"))
    assert redis_client.exists(keys.blob("r2"))  # not answered yet: the image stays

    assert deliver(redis_client, out, settings, "r2", overlay_key=keys.overlay("r2")) == ["photo"]
    assert len(fake.texts_to(CHAT)) == 1
    assert len(fake.calls_of("sendPhoto", CHAT)) == 1


def album_result() -> dict:
    """Two flagged findings drawn: the overlays go out as one album."""
    findings = [Finding(label="Effusion", probability=0.81, positive=True, threshold=0.5),
                Finding(label="Pleural_Thickening", probability=0.64, positive=True, threshold=0.5),
                Finding(label="Mass", probability=0.12, positive=False, threshold=0.5)]
    result = DiagnosisResult(outcome="analysed", is_xray=True, xray_probability=0.99, body_part="chest",
                             body_part_probability=0.97, findings=findings,
                             heatmap_labels=["Effusion", "Pleural_Thickening"])
    return result.model_dump(mode="json")


def store_album(redis_client, key: str) -> dict[str, bytes]:
    """As the diagnose task stores them: one hash, finding label → JPEG, with the blob TTL."""
    overlays = {"Pleural_Thickening": JPEG + b"thickening", "Effusion": JPEG + b"effusion"}
    redis_client.hset(key, mapping=overlays)
    redis_client.expire(key, 60)
    return overlays


def test_album_is_sent_once_in_drawn_order_with_one_localized_caption(telegram, fake, redis_client):
    out, settings, _ = telegram
    keys = settings.keys
    overlays = store_album(redis_client, keys.overlay("a1"))
    arguments = {"overlay_key": keys.overlay("a1"), "result": album_result()}
    assert deliver(redis_client, out, settings, "a1", language="ru", **arguments) == ["text0", "album"]
    assert deliver(redis_client, out, settings, "a1", language="ru", **arguments) == []  # redelivered

    assert not fake.calls_of("sendPhoto", CHAT)
    [album] = fake.calls_of("sendMediaGroup", CHAT)
    assert album.at > fake.calls_of("sendMessage", CHAT)[0].at  # after the text reply
    assert album.params["reply_parameters"] == {"message_id": 7, "allow_sending_without_reply": True}
    photos = fake.album_photos(CHAT)
    assert [jpeg for jpeg, _ in photos] == [overlays["Effusion"], overlays["Pleural_Thickening"]]
    assert [len(message["photo"]) for message in album.result] == [1, 1]  # the fake answers a message per photo
    caption, second = (caption for _, caption in photos)
    assert second == ""  # one caption per album: Telegram shows it once, under the album
    lines = caption.splitlines()
    assert lines[0].startswith("1. Тепловая карта: Плевральный выпот (оценка модели 81%)")  # each photo, in order
    assert lines[1].startswith("2. ") and "Утолщение плевры" in lines[1] and "64%" in lines[1]
    assert "Pleural_Thickening" not in caption
    assert sum("Красный" in line for line in lines) == 1 and sum("не диагноз" in line for line in lines) == 1
    assert not redis_client.exists(keys.blob("a1"), keys.overlay("a1"))
    assert redis_client.exists(keys.done("a1"), keys.sent("a1", "text0"), keys.sent("a1", "album")) == 3


def test_an_album_refused_once_is_sent_once_on_retry(telegram, fake, redis_client):
    out, settings, sleeps = telegram
    keys = settings.keys
    store_album(redis_client, keys.overlay("a2"))
    arguments = {"overlay_key": keys.overlay("a2"), "result": album_result()}
    fake.fail_next("sendMediaGroup", 429, retry_after=30)
    with pytest.raises(Deferred):
        deliver(redis_client, out, settings, "a2", **arguments)
    assert not sleeps  # a long flood wait is not slept through: the task is retried later
    assert redis_client.exists(keys.sent("a2", "text0")) and not redis_client.exists(keys.sent("a2", "album"))
    assert redis_client.exists(keys.overlay("a2"))  # not delivered yet: the overlays stay (with their TTL)
    assert deliver(redis_client, out, settings, "a2", **arguments) == ["album"]
    assert deliver(redis_client, out, settings, "a2", **arguments) == []
    assert len(fake.texts_to(CHAT)) == 1 and len(fake.calls_of("sendMediaGroup", CHAT)) == 1
    assert len(fake.album_photos(CHAT)) == 2 and not redis_client.exists(keys.overlay("a2"))


def test_short_retry_after_is_honoured(telegram, fake, redis_client):
    out, settings, sleeps = telegram
    fake.fail_next("sendMessage", 429, retry_after=1)
    deliver(redis_client, out, settings, "r3")
    attempts = fake.calls_of("sendMessage", CHAT, ok_only=False)
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 1.0
    assert sleeps and sleeps[0] >= 1.0


def test_5xx_is_retried_with_backoff_then_deferred(telegram, fake, redis_client):
    out, settings, sleeps = telegram
    fake.fail_next("sendMessage", 502, times=2)
    deliver(redis_client, out, settings, "r4")
    assert [c.status for c in fake.calls_of("sendMessage", CHAT, ok_only=False)] == [502, 502, 200]
    assert len(sleeps) == 2 and all(s > 0 for s in sleeps)

    fake.reset()
    fake.fail_next("sendMessage", 500, times=3)
    with pytest.raises(Deferred):
        deliver(redis_client, out, settings, "r5")
    assert not redis_client.exists(settings.keys.sent("r5", "text0"))
    deliver(redis_client, out, settings, "r5")  # the retried task
    assert len(fake.texts_to(CHAT)) == 1


def test_blocked_bot_is_undeliverable(telegram, fake, redis_client):
    out, settings, _ = telegram
    fake.fail_next("sendMessage", 403)
    with pytest.raises(Undeliverable):
        deliver(redis_client, out, settings, "r6")


def test_concurrent_delivery_of_the_same_request_waits(telegram, redis_client):
    out, settings, _ = telegram
    redis_client.set(settings.keys.lock("r7"), "someone else", ex=30)
    with pytest.raises(Deferred):
        deliver(redis_client, out, settings, "r7")


def test_apology_expired_and_long_texts():
    assert compose_texts("ru", None, "apology") == [apology("ru")]
    expired = compose_texts("kk", None, "expired")[0]
    assert "/forget" in expired and "қолжетімсіз" in expired
    assert compose_texts("en", {"outcome": "nonsense"}, None) == [apology("en")]  # unrenderable → apology

    text = "\n\n".join(f"paragraph {i} " + "x" * 900 for i in range(12))
    pieces = split_text(text, 4096)
    assert len(pieces) > 1 and all(len(p) <= 4096 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")
    assert split_text("y" * 9000, 4096) == ["y" * 4096, "y" * 4096, "y" * 808]


def real_jpeg(shade: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((96, 128, 3), shade, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_clinician_mode_adds_the_pdf_report_once_after_the_reply(telegram, fake, redis_client):
    """Clinician mode: text, overlay, then the one-page PDF as a document (issue #25); sent once."""
    import subprocess

    out, settings, _ = telegram
    keys = settings.keys
    redis_client.set(keys.overlay("p1"), real_jpeg(120), ex=60)
    request = RequestEnvelope(request_id="p1", chat_id=CHAT, reply_to_message_id=7, language="kk",
                              ack_message_id=99, blob_key=keys.blob("p1"), mode="clinician")
    redis_client.set(keys.blob("p1"), real_jpeg(140), ex=60)  # the user's image, still held
    result = analysed_result() | {"mode": "clinician"}
    arguments = {"result": result, "overlay_key": keys.overlay("p1")}
    assert send_reply(redis_client, out, settings, request, **arguments) == ["text0", "photo", "report"]
    assert send_reply(redis_client, out, settings, request, **arguments) == []  # redelivered: nothing again

    [document] = fake.calls_of("sendDocument", CHAT)
    assert document.at > fake.calls_of("sendPhoto", CHAT)[0].at  # after the reply and its overlay
    pdf = document.files["document"]
    assert pdf.startswith(b"%PDF") and "диагноз емес" in document.params["caption"]
    text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    assert "дәрігерге" in text and "Плевралық сұйықтық" in text  # Kazakh, the physician prompt, the findings
    assert not redis_client.exists(keys.blob("p1"), keys.overlay("p1"))  # cleaned up after the report


def test_screening_mode_sends_no_report(telegram, fake, redis_client):
    out, settings, _ = telegram
    keys = settings.keys
    redis_client.set(keys.overlay("p2"), real_jpeg(90), ex=60)
    assert deliver(redis_client, out, settings, "p2", overlay_key=keys.overlay("p2")) == ["text0", "photo"]
    assert not fake.calls_of("sendDocument", CHAT)


def test_an_answer_sent_while_redis_restarts_is_still_marked_answered(fake, tmp_path):
    """Redis dies while the overlay is being sent and comes back empty a second later: the delivery
    waits for it and writes the ``done`` mark, so the bot's watchdog never takes the answered
    request for lost (and tells the user to send it again)."""
    server = PrivateRedis(tmp_path / "redis").start()
    client = server.client()
    settings = service_settings(fake.url, TOKEN, server.url)
    keys = settings.keys
    out = TelegramOut(settings)
    try:
        client.set(keys.overlay("r9"), PNG, ex=60)

        def redis_restarts() -> None:
            server.kill()
            threading.Timer(1.0, server.start).start()

        fake.on_call("sendPhoto", redis_restarts)
        started = time.monotonic()
        sent = deliver(client, out, settings, "r9", overlay_key=keys.overlay("r9"))
        assert sent == ["text0", "photo"]
        assert time.monotonic() - started >= 1.0  # it waited for Redis
        assert client.exists(keys.done("r9"))  # in the new, empty Redis
        assert len(fake.texts_to(CHAT)) == 1 and len(fake.calls_of("sendPhoto", CHAT)) == 1
    finally:
        fake.on_call("sendPhoto", None)
        out.close()
        client.close()
        server.kill()
