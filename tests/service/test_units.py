"""Fast checks: settings, Celery configuration, the bot/worker contract, document types, catalogs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po
from pydantic import ValidationError

from bot.dispatch import diagnose_kwargs
from bot.images import is_image_document
from contract.envelope import RequestEnvelope
from contract.i18n import LANGUAGES
from contract.settings import ServiceSettings, Settings
from contract.texts import LOCALES_DIR

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- settings
def test_token_is_required_and_secret(monkeypatch):
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="TELEGRAM_BOT_TOKEN"):
        Settings(_env_file=None)
    with pytest.raises(ValidationError, match="TELEGRAM_BOT_TOKEN"):
        Settings(_env_file=None, TELEGRAM_BOT_TOKEN="")  # an unfilled .env
    settings = Settings(_env_file=None, TELEGRAM_BOT_TOKEN="1:abc")
    assert "1:abc" not in repr(settings)
    ServiceSettings(_env_file=None)  # Flower and inspect run without the token


def test_defaults_and_derived_values(monkeypatch):
    for name in ("TELEGRAM_API_URL", "REDIS_URL", "CELERY_BROKER_URL", "RATE_LIMIT_IMAGES", "BLOB_TTL_S"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None, TELEGRAM_BOT_TOKEN="1:abc", TELEGRAM_API_URL="http://127.0.0.1:8081/")
    assert settings.api_base_url == "http://127.0.0.1:8081/bot"
    assert settings.file_base_url == "http://127.0.0.1:8081/file/bot"
    assert settings.REDIS_URL == "redis://127.0.0.1:6379/0" == settings.broker_url
    assert (settings.RATE_LIMIT_IMAGES, settings.RATE_LIMIT_WINDOW_S) == (10, 600)
    assert settings.BLOB_TTL_S <= 3600
    assert settings.visibility_timeout_s > max(settings.DIAGNOSE_TIME_LIMIT_S, settings.DELIVER_TIME_LIMIT_S)
    assert settings.allowed(1, 1)  # no allowlist: everybody


def test_allowlists_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALLOWED_USER_IDS", "11, 12;13")
    monkeypatch.setenv("ALLOWED_CHAT_IDS", "[-100500]")
    settings = Settings(_env_file=None, TELEGRAM_BOT_TOKEN="1:abc")
    assert sorted(settings.ALLOWED_USER_IDS) == [11, 12, 13]
    assert sorted(settings.ALLOWED_CHAT_IDS) == [-100500]
    assert settings.allowed(12, 99) and settings.allowed(99, -100500) and not settings.allowed(99, 99)


@pytest.mark.parametrize("overrides", [
    {"BLOB_TTL_S": 3601},
    {"DIAGNOSE_SOFT_TIME_LIMIT_S": 120, "DIAGNOSE_TIME_LIMIT_S": 120},
    {"RATE_LIMIT_IMAGES": 0},
])
def test_invalid_settings_are_refused(overrides):
    with pytest.raises(ValidationError):
        Settings(_env_file=None, TELEGRAM_BOT_TOKEN="1:abc", **overrides)


# ----------------------------------------------------------------------------- Celery
def test_celery_is_json_only_with_late_acks_and_a_short_visibility_timeout():
    from contract.settings import CELERY_COUNTDOWN_MAX_S
    from worker import app
    from worker.celery_app import settings

    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    timeout = conf.broker_transport_options["visibility_timeout"]
    hard = max(settings.DIAGNOSE_TIME_LIMIT_S, settings.DELIVER_TIME_LIMIT_S)
    # One task run plus the short countdown Celery may hold; longer countdowns are parked in Redis
    # (worker.scheduler), so a dead worker's task comes back within a minute, not an hour.
    assert hard + CELERY_COUNTDOWN_MAX_S < timeout <= hard + CELERY_COUNTDOWN_MAX_S + 15 <= 60
    assert conf.worker_proc_alive_timeout >= 300  # models load before a child takes tasks
    routes = {q.name: q.routing_key for q in conf.task_queues}
    assert routes == {"inference": "inference", "delivery": "delivery"}


def test_tasks_are_named_routed_and_accept_what_the_bot_sends():
    from worker import app
    from worker.deliver import deliver
    from worker.diagnose import diagnose

    assert (diagnose.name, deliver.name) == ("diagnose", "deliver")
    assert app.amqp.router.route({}, "diagnose")["queue"].name == "inference"
    assert app.amqp.router.route({}, "deliver")["queue"].name == "delivery"
    assert diagnose.soft_time_limit < diagnose.time_limit and deliver.soft_time_limit < deliver.time_limit
    envelope = RequestEnvelope(request_id="r", blob_key="xso:blob:r", chat_id=1, reply_to_message_id=2, language="kk")
    sent = diagnose_kwargs(envelope)
    assert set(inspect.signature(diagnose.run).parameters) == set(sent)
    assert RequestEnvelope.model_validate(sent["envelope"]) == envelope  # one JSON field, round trip
    # turn_since: set only by deliver itself, when it waits for an earlier reply of the same chat.
    assert {"envelope", "result", "overlay_key", "failure", "turn_since"} == set(
        inspect.signature(deliver.run).parameters)


def test_importing_the_worker_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, worker, worker.resources, worker.diagnose, worker.deliver; "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ----------------------------------------------------------------------------- documents
@pytest.mark.parametrize(("name", "mime", "accepted"), [
    ("scan.jpg", "image/jpeg", True),
    ("scan.PNG", None, True),
    ("scan.webp", "image/webp", True),
    ("scan.tif", "image/tiff", True),
    ("study.dcm", "application/dicom", True),
    ("IM0001", "application/octet-stream", True),  # DICOM without extension
    ("1.2.840.113619.2.55.3.604688119", None, True),
    (None, None, True),
    ("report.pdf", "application/pdf", False),
    ("notes.txt", "text/plain", False),
    ("clip.mp4", "video/mp4", False),
    ("archive.zip", "application/octet-stream", False),
])
def test_which_documents_are_images(name, mime, accepted):
    assert is_image_document(name, mime) is accepted


# ----------------------------------------------------------------------------- catalogs
def extracted_messages() -> dict[str | tuple[str, ...], str]:
    """Every ``_()``, ``N_()``, ``ngettext()`` … literal in bot/, worker/ and contract/, with where it is."""
    found: dict[str | tuple[str, ...], str] = {}
    for folder in ("bot", "worker", "contract"):
        for filename, lineno, message, _comments, _context in extract_from_dir(
            ROOT / folder, method_map=[("**.py", "python")]
        ):
            found.setdefault(message, f"{folder}/{filename}:{lineno}")
    return found


def test_extraction_finds_the_bot_strings():
    messages = extracted_messages()
    assert len(messages) >= 20
    assert "Received, analysing…" in messages
    assert any(isinstance(m, tuple) for m in messages)  # plural forms are extracted too


@pytest.mark.parametrize("language", sorted(set(LANGUAGES) - {"en"}))
def test_every_bot_string_is_translated(language):
    path = LOCALES_DIR / language / "LC_MESSAGES" / "bot.po"
    with path.open("rb") as handle:
        catalog = read_po(handle, locale=language, domain="bot")
    problems = []
    for message, where in extracted_messages().items():
        msgid = message[0] if isinstance(message, tuple) else message
        entry = catalog.get(msgid)
        if entry is None:
            problems.append(f"missing: {msgid[:60]!r} ({where})")
            continue
        strings = entry.string if isinstance(entry.string, tuple) else (entry.string,)
        if entry.fuzzy or not all(s.strip() for s in strings):
            problems.append(f"empty or fuzzy: {msgid[:60]!r} ({where})")
        elif isinstance(message, tuple) and len(strings) != catalog.num_plurals:
            problems.append(f"plural forms: {msgid[:60]!r} has {len(strings)}, needs {catalog.num_plurals}")
        placeholders = {p for p in ("{user_id}", "{limit}", "{minutes}", "{count}", "{limit_line}", "{limit_mb}")
                        if p in msgid}
        if any(p not in s for s in strings for p in placeholders):
            problems.append(f"placeholder lost: {msgid[:60]!r}")
    assert not problems, "\n".join(problems)


def test_russian_plurals_are_right():
    from contract.texts import translator

    _, ngettext = translator("ru")
    one, other = "{count} image is ahead of yours in the queue.", "{count} images are ahead of yours in the queue."
    forms = [ngettext(one, other, n).format(count=n) for n in (1, 3, 5, 11, 21)]
    assert forms == ["Перед вашим в очереди 1 снимок.", "Перед вашим в очереди 3 снимка.",
                     "Перед вашим в очереди 5 снимков.", "Перед вашим в очереди 11 снимков.",
                     "Перед вашим в очереди 21 снимок."]
