"""Privacy and hostile input, end to end: real bot (``python -m bot``), real Redis, real worker.

* Image bytes never reach a log, a Telegram message, a file on disk, or stay in Redis; DICOM
  patient data (PatientName "DOE^JANE", PatientID "PID-12345") is never echoed or logged — with
  both processes logging at DEBUG.
* Every key the service writes in Redis has a TTL; Redis holds nothing but the service's keys and
  Celery's own queue bookkeeping.
* Bad files (empty, 100k×100k header, decompression bomb, DICOM without pixels, wrong extensions,
  huge metadata, too small) are answered with the clear message, through the whole service.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_dicom
from model_factory import make_models_dir
from PIL import Image, PngImagePlugin

from contract.redis_client import LOCK_KEY
from diagnosis.messages import analysed_heading, rejection_text

from .conftest import TOKEN, worker_env
from .harness import ROOT, BotProcess, WorkerProcess, chat_summary, sample_image

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
# Real radiograph pixels for the DICOM and PNG cases: a synthetic ramp is refused by the pipeline's
# photo-quality check as "blurred".
CHEST_PIXELS = np.asarray(Image.open(io.BytesIO(CHEST)).convert("L"))
ANALYSED = analysed_heading("chest", "en")
PATIENT = [b"DOE^JANE", b"JANE", b"PID-12345", b"19700101"]  # dicom_factory's name, id, birth date
CELERY_KEYS = re.compile(r"^(inference|delivery|unacked|unacked_index|unacked_mutex|_kombu\..*)$")  # kombu bookkeeping


@pytest.fixture(scope="module")
def worker(fake_telegram, redis_db, tmp_path_factory):
    models = make_models_dir(tmp_path_factory.mktemp("privacy-models"))
    log_dir = tmp_path_factory.mktemp("privacy-log")
    env = {**worker_env(fake_telegram.url, redis_db[0], models), "LOG_LEVEL": "DEBUG"}
    process = WorkerProcess(env, log_dir / "worker.log", extra_args=("--loglevel", "DEBUG")).start()
    yield process
    process.stop()


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """The JPEG with a COM segment right after SOI: a distinctive byte pattern inside the image."""
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def needles(data: bytes) -> list[bytes]:
    """Ways the bytes could show up in text: raw, hex, base64 at each of the three alignments."""
    middle = len(data) // 2
    chunk = data[middle:middle + 24]
    found = [chunk, chunk.hex().encode(), chunk.hex().upper().encode()]
    for shift in range(3):
        encoded = base64.b64encode(data[shift:])
        found.append(encoded[len(encoded) // 2:len(encoded) // 2 + 32])
    return found


def leaks(blob: bytes, forbidden: list[bytes]) -> list[bytes]:
    return [item for item in forbidden if item in blob]


def redis_dump(client) -> dict[str, tuple[int, bytes]]:
    """Every key of the test database: (ttl, everything it holds, concatenated)."""
    dump = {}
    for raw in client.scan_iter("*", count=500):
        key = raw.decode()
        kind = client.type(raw).decode()
        if kind == "string":
            value = client.get(raw) or b""
        elif kind == "list":
            value = b"".join(client.lrange(raw, 0, -1))
        elif kind == "hash":
            value = b"".join(k + v for k, v in client.hgetall(raw).items())
        elif kind == "set":
            value = b"".join(client.smembers(raw))
        elif kind == "zset":
            value = b"".join(member for member, _ in client.zrange(raw, 0, -1, withscores=True))
        else:
            value = b""
        dump[key] = (client.ttl(raw), value)
    return dump


def files_written_since(started: float, roots: list[Path], skip: tuple[str, ...]) -> list[Path]:
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for folder, folders, names in os.walk(root):
            folders[:] = [f for f in folders if f not in skip]
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if stat.st_mtime >= started and stat.st_size < 64 * 1024 * 1024 and path.is_file():
                    found.append(path)
    return found


def test_no_image_bytes_or_patient_data_in_logs_messages_redis_or_disk(worker, fake, redis_client, redis_db,
                                                                       tmp_path):
    started = time.time()
    marker = b"XSO-PRIVATE-" + secrets.token_hex(16).encode()
    photo = with_comment(CHEST, marker)
    dicom = make_dicom(CHEST_PIXELS.astype(np.uint16) * 16, bits=12)  # PatientName DOE^JANE, PatientID PID-12345
    assert b"DOE^JANE" in dicom and b"PID-12345" in dicom
    forbidden = [marker, marker.hex().encode(), base64.b64encode(marker)[:24], *needles(photo), *needles(dicom),
                 *PATIENT]
    photo_user, dicom_user = 1601, 1602

    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": fake.url, "REDIS_URL": redis_db[0], "LOG_LEVEL": "DEBUG"}
    bot = BotProcess(env, tmp_path / "bot.log").start(fake)
    try:
        fake.inject_photo(photo_user, photo, caption="my chest")
        fake.inject_document(photo_user, photo, file_name="scan.jpg", mime_type="image/jpeg")
        fake.inject_document(dicom_user, dicom, file_name="IM0001", mime_type="application/octet-stream")
        fake.inject_document(dicom_user, make_dicom(None), file_name="study.dcm", mime_type="application/dicom")
        fake.inject_document(dicom_user, dicom[:-20000], file_name="cut.dcm", mime_type="application/dicom")
        fake.wait_for(lambda: len(chat_summary(fake, photo_user).results) == 2
                      and len(chat_summary(fake, dicom_user).results) == 3
                      and fake.calls_of("deleteMessage", dicom_user), timeout=90)
        time.sleep(1.0)
    finally:
        bot.stop()
    dicom_replies = chat_summary(fake, dicom_user).results
    assert sum(t.startswith(ANALYSED) for t in dicom_replies) == 1
    assert any(t.startswith(rejection_text("no_pixels", "en")) for t in dicom_replies)
    assert any(t.startswith(rejection_text("corrupt", "en")) for t in dicom_replies)

    # Logs of both processes, at DEBUG.
    for name, log in (("worker", worker.log()), ("bot", bot.log())):
        assert "DEBUG" in log, f"{name} did not log at DEBUG"
        assert TOKEN.split(":")[1] not in log, f"{name} log holds the bot token"
        assert not leaks(log.encode(), forbidden), f"{name} log leaks {leaks(log.encode(), forbidden)}"
    # Everything sent to Telegram: texts, captions, edits, and the overlay JPEGs.
    for call in fake.calls:
        if call.method in ("download", "getFile", "getUpdates"):
            continue
        sent = json.dumps(call.params, ensure_ascii=False).encode() + b"".join(call.files.values())
        assert not leaks(sent, forbidden), (call.method, leaks(sent, forbidden))
    # Redis: no image left, every service key expires, nothing but the service's and Celery's keys.
    for key, (ttl, value) in redis_dump(redis_client).items():
        assert not leaks(value, [marker, *needles(photo)[:1], *needles(dicom)[:1], b"DOE^JANE"]), key
        if key.startswith("xso:"):
            assert ttl > 0, f"{key} has no TTL"
        else:
            assert CELERY_KEYS.match(key) or key == LOCK_KEY, f"unexpected key {key}"
    # Disk: no file written during the test holds the image or the patient data.
    roots = [ROOT, Path(tempfile.gettempdir()), Path.home() / ".cache" / "xray-second-opinion"]
    for path in files_written_since(started, roots, skip=(".venv", ".git", "__pycache__", ".ruff_cache",
                                                           "xso-fuzz-findings", "xso-fuzz-corpus")):
        try:
            content = path.read_bytes()
        except OSError:
            continue
        assert marker not in content and b"DOE^JANE" not in content, f"{path} holds image or patient data"


def test_every_service_key_in_redis_has_a_ttl_after_a_full_run(worker, start_bot, fake, redis_client):
    user = 1603
    with start_bot():
        fake.inject_text(user, "/language")
        menu = fake.wait_for(lambda: fake.calls_of("sendMessage", user))[0]
        fake.inject_callback(user, "lang:ru", menu.result)  # language key
        fake.wait_for(lambda: fake.calls_of("editMessageText", user))
        for _ in range(2):
            fake.inject_photo(user, CHEST)  # rate-limit, request index, marks, done
        fake.wait_for(lambda: len(chat_summary(fake, user, "ru").results) == 2, timeout=60)
        time.sleep(1.0)
    keys = {key: ttl for key, (ttl, _) in redis_dump(redis_client).items() if key.startswith("xso:")}
    kinds = {key.split(":")[1] for key in keys}
    assert {"lang", "rate", "done", "sent"} <= kinds, kinds
    keys = {key: ttl for key, ttl in keys.items() if ttl != -2}  # -2: deleted since the scan (a delivery's cleanup)
    assert all(ttl > 0 for ttl in keys.values()), {k: t for k, t in keys.items() if t <= 0}


# ----------------------------------------------------------------------------- bad input, end to end
def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + \
        chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _bad_inputs() -> dict[str, tuple[bytes, str, str, str]]:
    """name → (bytes, file name, MIME type, rejection code or "analysed")."""
    chest = Image.fromarray(CHEST_PIXELS)
    big_text = PngImagePlugin.PngInfo()
    big_text.add_text("Comment", "x" * 3_000_000)
    dicom = pydicom.dcmread(io.BytesIO(make_dicom(CHEST_PIXELS.astype(np.uint16) * 16, bits=12)))
    dicom.add_new((0x0009, 0x0010), "LO", "XSO TEST")
    dicom.add_new((0x0009, 0x1010), "OB", b"\x00" * 6_000_000)  # 6 MB of private metadata
    dicom.ImageComments = "c" * 10_000
    buffer = io.BytesIO()
    dicom.save_as(buffer)
    return {
        "empty": (b"", "xray.jpg", "image/jpeg", "empty"),
        "100k-header": (_png(100_000, 100_000), "xray.png", "image/png", "too_many_pixels"),
        "bomb": (_encode(Image.new("L", (8000, 8000)), "PNG", optimize=True), "bomb.png", "image/png",
                 "too_many_pixels"),
        "dicom-no-pixels": (make_dicom(None), "IM0002", "application/octet-stream", "no_pixels"),
        "pdf-named-jpg": (b"%PDF-1.4\n" + b"x" * 5000, "scan.jpg", "image/jpeg", "unsupported"),
        "png-named-dcm": (_encode(chest, "PNG"), "study.dcm", "application/dicom", "analysed"),
        "huge-png-text": (_encode(chest, "PNG", pnginfo=big_text), "text.png", "image/png", "analysed"),
        "huge-dicom-metadata": (buffer.getvalue(), "big.dcm", "application/dicom", "analysed"),
        "too-small": (_encode(Image.new("L", (20, 20)), "PNG"), "tiny.png", "image/png", "too_small"),
    }


def test_bad_files_get_the_clear_message_end_to_end(worker, start_bot, fake):
    cases = _bad_inputs()
    users = {name: 1700 + index for index, name in enumerate(cases)}
    with start_bot():
        for name, (data, file_name, mime, _) in cases.items():
            fake.inject_document(users[name], data, file_name=file_name, mime_type=mime)
        fake.wait_for(lambda: all(chat_summary(fake, user).results for user in users.values()), timeout=120)
        time.sleep(1.0)
    for name, (_, _, _, expected) in cases.items():
        summary = chat_summary(fake, users[name])
        assert len(summary.results) == 1, (name, summary)
        start = ANALYSED if expected == "analysed" else rejection_text(expected, "en")
        assert summary.results[0].startswith(start), (name, summary.results[0][:200])
        assert summary.overlay_sends == (1 if expected == "analysed" else 0), name  # a photo or an album
    assert worker.process is not None and worker.process.poll() is None

