"""One place per fact: modes, backend names and heatmap kinds are each written once (in contract/) and
imported everywhere else; every backend the settings accept is one the runner factory knows."""

from __future__ import annotations

import re
from typing import get_args

import pytest
from conftest import ROOT

from contract.envelope import MODES, RequestEnvelope
from contract.settings import BACKENDS, HEATMAPS, ServiceSettings
from diagnosis import backends
from diagnosis.config import PipelineConfig
from training.data.datasets import CHEST_LABELS

PACKAGES = ("contract", "diagnosis", "bot", "worker", "training", "api", "bench")


def sources(*extra: str) -> dict[str, str]:
    """Every Python file of the service and training packages (and ``extra`` folders), found from the
    repository root (not the working directory), by its path relative to the root."""
    return {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
            for package in PACKAGES + extra for path in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize(("words", "home", "extra"), [
    (MODES, "contract/envelope.py", ()), (HEATMAPS, "contract/settings.py", ()),
    (("onnx", "openvino", "openvino-bf16"), "contract/settings.py", ()),
    (tuple(CHEST_LABELS[:3]), "training/data/datasets.py", ("tests",)),
])  # fmt: skip
def test_each_list_is_written_once(words, home, extra):
    spelled = re.compile(r"""["']""" + r"""["']\s*,\s*["']""".join(map(re.escape, words)) + r"""["']""")
    places = sorted(path for path, text in sources(*extra).items() if spelled.search(text))
    assert places == [home], places


def test_every_backend_the_settings_accept_can_be_built():
    accepted = get_args(get_args(ServiceSettings.model_fields["BACKEND"].annotation)[0])
    assert set(accepted) == set(BACKENDS) == set(backends.BACKENDS)
    assert "openvino-bf16" in backends.BACKENDS
    for backend in BACKENDS:
        PipelineConfig(backend=backend)  # the configuration takes every name the settings take
    assert set(get_args(RequestEnvelope.model_fields["mode"].annotation)) == set(MODES)


@pytest.mark.parametrize(("path", "name"), [("worker/telegram_out.py", "TelegramOut"), ("contract/keys.py", "Keys"),
                                            ("diagnosis/pipeline.py", "Analysis")])
def test_no_dead_public_methods(path, name):
    """Every public method or property of these classes is used somewhere in the packages."""
    import ast

    tree = ast.parse((ROOT / path).read_text())
    [cls] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    methods = [n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    code = "\n".join(sources().values())
    unused = [m for m in methods if not re.search(rf"\.{m}\b", code)]
    assert not unused, f"{name}: {unused} never used"


def test_cleanup_deletes_the_request_keys_and_keeps_the_marks():
    """deliver.cleanup deletes exactly Keys.request_keys (+ the envelope's blob and the overlay it was
    given); the lock and the done mark stay, so a redelivered task does not answer twice."""
    import secrets

    import redis

    from contract.envelope import RequestEnvelope
    from contract.keys import Keys
    from worker.deliver import cleanup

    client = redis.Redis.from_url("redis://127.0.0.1:6379/15")
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    keys, request_id = Keys(f"test-cleanup-{secrets.token_hex(4)}:"), "r1"
    request = RequestEnvelope(request_id=request_id, blob_key=keys.blob("other"), chat_id=1, reply_to_message_id=None,
                              language="en")
    gone = [*keys.request_keys(request_id), request.blob_key, keys.overlay("given")]
    kept = [keys.lock(request_id), keys.done(request_id), keys.sent(request_id, "text")]
    try:
        for key in gone + kept:
            client.set(key, "1", ex=60)
        cleanup(client, keys, request, keys.overlay("given"))
        assert client.exists(*gone) == 0 and client.exists(*kept) == len(kept)
    finally:
        client.delete(*gone, *kept)


def test_env_example_lists_every_setting():
    """.env.example names every setting of contract.settings (set or commented out with its default),
    and nothing else but the compose-only variables of docker-compose.yml."""
    from contract.settings import Settings

    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert not set(Settings.model_fields) - named, sorted(set(Settings.model_fields) - named)
    compose = (ROOT / "docker-compose.yml").read_text()
    others = named - set(Settings.model_fields)
    assert others and all(name in compose for name in others), sorted(others)


def test_the_urgent_labels_are_written_once():
    """The labels whose reply may say "urgent" are the keys of diagnosis.messages.URGENT_MEANING (the
    wording needs them anyway); calibration imports them instead of keeping a list of its own."""
    import ast

    from diagnosis.messages import URGENT_MEANING
    from training.card import calibrate

    homes = []
    for path, text in sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                         if isinstance(t, ast.Name)]
                labels = [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)
                          and c.value in CHEST_LABELS] if node.value else []
                if labels and any("URGENT" in name for name in names):
                    homes.append(f"{path}:{names[0]}")
    assert homes == ["diagnosis/messages.py:URGENT_MEANING"], homes
    assert calibrate.URGENT_MEANING is URGENT_MEANING


FORMAT_WORDS = re.compile(r"\b(jpe?g|png|webp|tiff?|bmp|dicom|dcm)\b", re.IGNORECASE)
FORMAT_FAMILY = {"jpg": "jpeg", "tif": "tiff", "dcm": "dicom"}


def decodable_formats() -> list[str]:
    """The user-facing name of every format the intake decodes: each format Pillow can write, and DICOM,
    tried on a small picture (whatever the intake's own list says)."""
    import contextlib
    import io
    import warnings

    import numpy as np
    from dicom_factory import make_dicom
    from PIL import Image

    from contract.formats import FORMATS
    from diagnosis.intake import ImageRejected, decode

    picture = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8), (96, 1)))
    Image.init()  # every plugin, so that Image.SAVE lists every writable format
    accepted = {decode(make_dicom(np.asarray(picture))).format}
    for pil in sorted(set(Image.SAVE)):
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Pillow's old formats still count
                picture.convert("RGB").save(buffer, format=pil)
        except Exception:  # a format Pillow cannot write this picture in: nothing to try
            continue
        with contextlib.suppress(ImageRejected):  # a format the intake refuses: nothing to name
            accepted.add(decode(buffer.getvalue()).format)
    names = {f.pil or f.name: f.name for f in FORMATS}
    assert accepted <= set(names), f"the intake decodes {sorted(accepted - set(names))}, which FORMATS does not name"
    return sorted(names[fmt] for fmt in accepted)


def test_every_format_the_intake_takes_is_named_in_every_language():
    from api.texts import page_texts
    from contract import texts
    from contract.i18n import LANGUAGES
    from diagnosis.messages import rejection_text

    formats = decodable_formats()
    assert "BMP" in formats and "DICOM" in formats and "WebP" in formats
    for language in LANGUAGES:
        said = {"start": texts.start(language), "help": texts.help_text(language, 10, 60),
                "not an image": texts.not_an_image_file(language), "other": texts.other_message(language),
                "unsupported": rejection_text("unsupported", language), "page": str(page_texts(language)["intro"])}
        missing = {what: [f for f in formats if f not in text] for what, text in said.items()}
        assert not any(missing.values()), (language, missing)


def test_the_formats_are_listed_in_one_place():
    """No code, page or catalog lists formats of its own (three or more format names close together):
    contract/formats.py is the list; the intake, the bot's filter and every text are built from it."""
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*"))
             if path.suffix in (".py", ".html", ".js", ".po") and path != ROOT / "contract" / "formats.py"]
    lists = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        found = [(m.start(), FORMAT_FAMILY.get(m.group(1).lower(), m.group(1).lower()))
                 for m in FORMAT_WORDS.finditer(text)]
        for i, (start, _family) in enumerate(found):
            if len({family for at, family in found[i:] if at - start <= 60}) >= 3:
                lists.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, start) + 1}")
                break
    assert lists == [], lists


def test_too_large_is_said_one_way():
    """The bot's refusal before download, the intake's refusal in a reply (worker, CLI) and the API's
    413 say the same text in every language, from one msgid; no other text refuses a file for its size
    in megabytes."""
    from contract import texts
    from contract.i18n import LANGUAGES
    from diagnosis.messages import rejection_text

    for language in LANGUAGES:
        assert rejection_text("too_large", language) == texts.too_large(language), language
    sizes = re.compile(r"""["'][^"'\n]*\b(too large|too big|larger than|bigger than)\b[^"'\n]*(\{limit|MB)""",
                       re.IGNORECASE)
    said = sorted(path for path, text in sources().items() if sizes.search(text))
    assert said == ["contract/texts.py"], said
    catalogs = [path for domain in ("contract", "diagnosis", "api") for path in (ROOT / domain).rglob("*.po")
                if re.search(r'^"?[^"\n]*(too large|larger than)[^"\n]*\{limit_mb\}', path.read_text(), re.MULTILINE)
                and "contract/locales" not in str(path)]
    assert not catalogs, catalogs


def test_start_names_the_parts_of_the_model_cards_present(tmp_path):
    """/start says which body parts are analysed from the abnormality cards present (the JSON only, as
    the bot reads them), in the very sentence of the reply to a film of another part; no language's
    /start text names a part of its own."""
    import json
    import shutil

    from contract import texts
    from contract.i18n import LANGUAGES
    from diagnosis.cards import analysable_parts
    from diagnosis.config import DEFAULT_MODELS_DIR
    from diagnosis.messages import analysable_sentence, body_part_name, render_reply
    from diagnosis.report import DiagnosisResult

    assert analysable_parts(DEFAULT_MODELS_DIR) == ["chest"]
    for name in ("gate", "body_part", "chest"):
        shutil.copy(DEFAULT_MODELS_DIR / name / "card.json", (tmp_path / name).mkdir() or tmp_path / name)
    knee = json.loads((tmp_path / "chest" / "card.json").read_text()) | {"name": "knee", "body_part": "knee"}
    (tmp_path / "knee").mkdir()
    (tmp_path / "knee" / "card.json").write_text(json.dumps(knee))
    parts = analysable_parts(tmp_path)
    assert parts == ["chest", "knee"] and analysable_parts(tmp_path, {"hand": "hand_v2"}) == ["chest", "hand", "knee"]
    assert analysable_parts(tmp_path / "nowhere") == []
    for language in LANGUAGES:
        sentence = analysable_sentence(parts, language)
        reply = render_reply(DiagnosisResult(outcome="body_part_not_analysed", body_part="hand",
                                             analysable_parts=parts), language)
        assert sentence and sentence in reply.splitlines(), language
        assert sentence in texts.start(language, sentence), language
        bare = texts.start(language)
        assert not [part for part in ("chest", "knee", "hand") if body_part_name(part, language) in bare], language
    assert "chest" not in texts.start("en").lower()


def test_one_telegram_retry_loop():
    """The bot's HTTP layer (contract.telegram.RetryingRequest) and the delivery worker
    (worker.telegram_out.TelegramOut) both run contract.telegram.retrying; neither has a loop of its own
    that sleeps between tries."""
    import ast

    loops = []
    for path in ("contract/telegram.py", "worker/telegram_out.py"):
        tree = ast.parse((ROOT / path).read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for loop in (node for node in ast.walk(function) if isinstance(node, ast.While | ast.For)):
                sleeps = [call for call in ast.walk(loop) if isinstance(call, ast.Call) and
                          (getattr(call.func, "attr", None) or getattr(call.func, "id", "")).endswith("sleep")]
                if sleeps:
                    loops.append(f"{path}:{function.name}")
    assert sorted(set(loops)) == ["contract/telegram.py:retrying"], loops
    users = [path for path in ("contract/telegram.py", "worker/telegram_out.py")
             if re.search(r"\bretrying\(", (ROOT / path).read_text().split("async def retrying(", 1)[-1])]
    assert users == ["contract/telegram.py", "worker/telegram_out.py"], users
