"""End to end: fake Telegram → real bot → real Redis → real Celery worker (solo) → real pipeline → reply.

The worker loads random-weight models from ``tests/model_factory.py`` whose biases force the chest
route (X-ray, chest, Effusion and Cardiomegaly positive), so the replies do not depend on how good
the trained models are. One worker serves the whole module.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from dicom_factory import make_dicom
from model_factory import make_models_dir
from PIL import Image

from bot.dispatch import Dispatcher, diagnose_kwargs
from contract.envelope import RequestEnvelope
from diagnosis.intake import ImageRejected, decode
from diagnosis.messages import PHYSICIAN, analysed_heading, gettext_for, rejection_text

from .conftest import start_worker
from .harness import chat_summary, sample_image

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
JPEG_MAGIC = b"\xff\xd8\xff"


def physician(language: str) -> str:
    return gettext_for(language)(PHYSICIAN)


def analysed_line(language: str) -> str:
    return analysed_heading("chest", language)


@pytest.fixture(scope="module")
def worker(fake_telegram, redis_db, tmp_path_factory):
    models = make_models_dir(tmp_path_factory.mktemp("chest-models"))
    process = start_worker(fake_telegram, redis_db, models, tmp_path_factory.mktemp("worker-log"))
    yield process
    process.stop()


def replies(fake, chat_id: int, language: str = "en") -> list[str]:
    """Final answers sent to a chat: readings (with the physician prompt) and refusals (by their opening)."""
    return chat_summary(fake, chat_id, language).results


def overlay_sends(fake, chat_id: int) -> list:
    """Overlay deliveries to a chat: one sendPhoto (one finding drawn) or one sendMediaGroup (several)."""
    return sorted(fake.calls_of("sendPhoto", chat_id) + fake.calls_of("sendMediaGroup", chat_id), key=lambda c: c.at)


def overlay_photos(fake, chat_id: int) -> list[tuple[bytes, str]]:
    """(JPEG, caption) of every overlay photo sent to a chat, single or in an album."""
    singles = [(c.files["photo"], str(c.params.get("caption", ""))) for c in fake.calls_of("sendPhoto", chat_id)]
    return singles + fake.album_photos(chat_id)


def settle(fake, chat_id: int, texts: int, overlays: int, language: str = "en", timeout: float = 60) -> None:
    """Wait for the expected replies and overlay deliveries, then a little longer to catch any duplicate."""
    fake.wait_for(lambda: len(replies(fake, chat_id, language)) >= texts
                  and len(overlay_sends(fake, chat_id)) >= overlays, timeout=timeout)
    time.sleep(0.5)
    assert len(replies(fake, chat_id, language)) == texts, fake.texts_to(chat_id)
    assert len(overlay_sends(fake, chat_id)) == overlays


def test_chest_photo_gets_one_findings_text_and_one_overlay(worker, start_bot, fake, redis_client):
    user = 701
    with start_bot():
        message = fake.inject_photo(user, CHEST, forwarded=True)
        settle(fake, user, texts=1, overlays=1)
        fake.wait_for(lambda: fake.calls_of("deleteMessage", user))
    ack, *_ = fake.calls_of("sendMessage", user)
    assert ack.params["text"].startswith("Received, analysing…")
    text = replies(fake, user)[0]
    assert text.startswith(analysed_line("en"))
    assert "Pleural effusion" in text and "Cardiomegaly" in text
    assert text.rstrip().endswith(physician("en"))
    # One image per drawn finding (both flagged findings here: an album), after the text, each with
    # a caption naming its finding in words, with its estimate and what the colours mean.
    drawn = text.split("show, for ")[1].split(", the areas")[0].split(", ")
    assert drawn == ["Pleural effusion", "Cardiomegaly"] or drawn == ["Cardiomegaly", "Pleural effusion"]
    [album] = overlay_sends(fake, user)
    assert album.method == "sendMediaGroup" and album.at > fake.calls_of("sendMessage", user)[-1].at
    photos = overlay_photos(fake, user)
    # One caption for the album, under its first photo: the numbered titles, then the colours once.
    first, *others = [caption for _, caption in photos]
    assert not any(others)
    titles = [line.split(" (")[0] for line in first.split("\n")[: len(drawn)]]
    assert titles == [f"{number}. Heat map: {name}" for number, name in enumerate(drawn, start=1)]
    assert first.count("Red: areas where this film raised the estimate") == 1 and "not a diagnosis" in first
    for jpeg, _ in photos:
        image = Image.open(io.BytesIO(jpeg))
        assert jpeg.startswith(JPEG_MAGIC) and max(image.size) <= 1280
    assert len({jpeg for jpeg, _ in photos}) == len(photos)  # a different map per finding
    for call in (fake.calls_of("sendMessage", user)[-1], album):
        assert call.params["reply_parameters"]["message_id"] == message["message_id"]
    assert fake.calls_of("deleteMessage", user)[0].params["message_id"] == ack.result["message_id"]
    fake.wait_for(lambda: not list(redis_client.scan_iter("xso:blob:*")))  # deleted once answered
    assert not list(redis_client.scan_iter("xso:overlay:*"))


def test_dicom_document_without_extension(worker, start_bot, fake):
    user = 702
    ramp = np.tile(np.linspace(0, 4000, 256), (256, 1))
    with start_bot():
        fake.inject_document(user, make_dicom(ramp, bits=12), file_name="IM0001", mime_type="application/octet-stream")
        fake.inject_document(user, make_dicom(ramp, bits=12), file_name="study.dcm", mime_type="application/dicom")
        settle(fake, user, texts=2, overlays=2)
    assert all(t.startswith(analysed_line("en")) for t in replies(fake, user))


def test_corrupt_file_gets_the_clear_error_and_no_overlay(worker, start_bot, fake):
    user = 703
    truncated = CHEST[: len(CHEST) // 3]
    try:
        decode(truncated)
        pytest.fail("the truncated JPEG decoded")
    except ImageRejected as rejected:
        expected = rejection_text(rejected.code, "en")
    with start_bot():
        fake.inject_document(user, truncated, file_name="xray.jpg", mime_type="image/jpeg")
        settle(fake, user, texts=1, overlays=0)
    assert replies(fake, user)[0].startswith(expected)


def test_album_of_three_gets_three_answers(worker, start_bot, fake):
    user = 704
    with start_bot():
        sent = [fake.inject_photo(user, CHEST, media_group_id="album-1") for _ in range(3)]
        settle(fake, user, texts=3, overlays=3)
    answered = {c.params["reply_parameters"]["message_id"] for c in overlay_sends(fake, user)}
    assert answered == {m["message_id"] for m in sent}


def test_russian_and_kazakh_replies(worker, start_bot, fake):
    russian, kazakh = 705, 706
    with start_bot():
        fake.inject_photo(russian, CHEST, language_code="ru")
        fake.inject_text(kazakh, "/language", language_code="en")
        menu = fake.wait_for(lambda: fake.calls_of("sendMessage", kazakh))[0]
        fake.inject_callback(kazakh, "lang:kk", menu.result)
        fake.wait_for(lambda: fake.calls_of("editMessageText", kazakh))
        fake.inject_photo(kazakh, CHEST, language_code="en")
        settle(fake, russian, texts=1, overlays=1, language="ru")
        settle(fake, kazakh, texts=1, overlays=1, language="kk")
    assert fake.texts_to(russian)[0].startswith("Получено, анализирую…")
    assert replies(fake, russian, "ru")[0].startswith(analysed_line("ru"))
    assert replies(fake, kazakh, "kk")[0].startswith(analysed_line("kk"))
    assert analysed_line("ru") != analysed_line("en") != analysed_line("kk")
    for chat, title, red in ((russian, "Тепловая карта: ", "Красный"), (kazakh, "Жылу картасы: ", "Қызыл")):
        first, *others = [caption for _, caption in overlay_photos(fake, chat)]  # one caption per album
        assert title in first.split("\n")[0] and red in first and "Effusion" not in first and not any(others)


# ----------------------------------------------------------------------- tasks sent directly (no bot)
def dispatch(make_settings, redis_client, chat_id: int, request_id: str, data: bytes | None = CHEST,
             language: str = "en") -> RequestEnvelope:
    settings = make_settings()
    blob_key = settings.keys.blob(request_id)
    if data is not None:
        redis_client.set(blob_key, data, ex=600)
    request = RequestEnvelope(request_id=request_id, blob_key=blob_key, chat_id=chat_id, reply_to_message_id=1,
                              language=language, ack_message_id=None)
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.enqueue_sync(request)
    finally:
        dispatcher.close()
    return request


def test_redelivered_diagnose_does_not_reply_twice(worker, fake, make_settings, redis_client):
    chat = 707
    request = dispatch(make_settings, redis_client, chat, "redelivered")
    settle(fake, chat, texts=1, overlays=1)
    dispatch(make_settings, redis_client, chat, request.request_id)  # the same request again
    time.sleep(2.0)
    assert len(replies(fake, chat)) == 1 and len(overlay_sends(fake, chat)) == 1
    assert "skipped" in worker.log()


def test_request_that_keeps_failing_gets_an_apology(worker, fake, make_settings, redis_client):
    chat = 708
    redis_client.set("xso:attempts:doomed", 3, ex=600)  # three workers already died on it
    dispatch(make_settings, redis_client, chat, "doomed", language="ru")
    settle(fake, chat, texts=1, overlays=0, language="ru")
    assert replies(fake, chat, "ru")[0].startswith("Извините")
    assert not redis_client.exists("xso:blob:doomed")


def test_expired_image_is_explained(worker, fake, make_settings, redis_client):
    chat = 709
    dispatch(make_settings, redis_client, chat, "expired", data=None)
    fake.wait_for(lambda: fake.texts_to(chat), timeout=60)
    assert "no longer available" in fake.texts_to(chat)[0]


def test_flood_control_retries_the_task_after_retry_after(worker, fake, make_settings, redis_client):
    chat = 710
    fake.fail_next("sendMessage", 429, retry_after=6)  # longer than the inline wait: Celery retry
    dispatch(make_settings, redis_client, chat, "flood")
    settle(fake, chat, texts=1, overlays=1, timeout=90)
    attempts = fake.calls_of("sendMessage", chat, ok_only=False)
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 6.0


def test_pickled_messages_are_refused(worker, fake, make_settings, redis_client):
    from celery import Celery

    settings = make_settings()
    sender = Celery("attacker", broker=settings.broker_url, set_as_current=False)
    sender.conf.task_serializer = "pickle"
    try:
        envelope = RequestEnvelope(request_id="pickled", blob_key="xso:blob:pickled", chat_id=711,
                                   reply_to_message_id=1, language="en")
        sender.send_task("diagnose", kwargs=diagnose_kwargs(envelope), queue="inference")
    finally:
        sender.close()
    fake.wait_for(lambda: "untrusted content" in worker.log() or "ContentDisallowed" in worker.log(), timeout=30)
    time.sleep(0.5)
    assert not fake.texts_to(711)
