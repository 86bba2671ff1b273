"""HTTP API parts without services: the page's catalogs, the keys file, callback signatures."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from api.auth import KeyFile
from api.schema import Analysis
from api.texts import gettext_for, page_texts
from contract.analyses import callback_secret, callback_target_refused, signature_header, verify_signature
from contract.i18n import LANGUAGES, RTL

BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


WEB_LOCALES = Path(__file__).resolve().parents[1] / "api" / "locales"
STATIC = Path(__file__).resolve().parents[1] / "api" / "static"
TRANSLATED = sorted(set(LANGUAGES) - {"en"})


def test_every_language_the_bot_speaks_has_a_web_catalog_and_no_other():
    on_disk = {path.parents[1].name for path in WEB_LOCALES.glob("*/LC_MESSAGES/web.po")}
    assert on_disk == set(TRANSLATED)


@pytest.mark.parametrize("language", TRANSLATED)
def test_web_catalog_translates_every_page_text(language):
    _ = gettext_for(language)
    found = {m[2] for m in extract_from_dir("api", keywords={"N_": None, "_": None}) if isinstance(m[2], str)}
    assert found, "no texts extracted"
    assert [m for m in found if _(m) == m] == []
    with (WEB_LOCALES / language / "LC_MESSAGES" / "web.po").open("rb") as handle:
        catalog = read_po(handle, locale=language, domain="web", abort_invalid=True)
    assert [m.id for m in catalog if m.id and (m.fuzzy or m.id not in found)] == []  # no fuzzy, none left over
    assert not catalog.obsolete
    assert not [m.id for m in catalog if m.id and any(c in m.string for c in BIDI_CONTROLS)]
    texts = page_texts(language)
    assert texts["physician"] and texts["findings"]["Effusion"] != "Pleural effusion"
    assert texts["language"] == language and texts["languages"] == LANGUAGES
    assert texts["dir"] == ("rtl" if language in RTL else "ltr")


def test_the_page_offers_every_language_in_its_own_name_and_turns_right_to_left():
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    select = re.search(r'<select id="language">(.*?)</select>', html, re.S).group(1)
    options = re.findall(r'<option value="([a-z]+)" lang="([a-z]+)">([^<]+)</option>', select)
    assert [(code, name) for code, _lang, name in options] == list(LANGUAGES.items())  # endonyms, in order
    assert all(code == lang for code, lang, _name in options)
    assert page_texts("en")["dir"] == "ltr" and {page_texts(code)["dir"] for code in RTL} == {"rtl"}
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    assert "document.documentElement.dir" in script and '"en", "ru", "kk"' not in script
    # a right-to-left page mirrors: no physical left/right in the style sheet, logical properties instead
    assert not re.search(r"(margin|padding|border)-(left|right)|text-align: *(left|right)",
                         (STATIC / "app.css").read_text(encoding="utf-8"))


def test_the_analysis_document_takes_every_language():
    assert Analysis.model_json_schema()["properties"]["language"]["enum"] == list(LANGUAGES)


def test_keys_are_printed_once_stored_hashed_and_revocable(tmp_path):
    store = KeyFile(tmp_path / "keys.json")
    key = store.create("clinic-a")
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and json.loads(text)["keys"]["clinic-a"]["sha256"]
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert store.authenticate(key) == "clinic-a"
    assert store.authenticate(key + "x") is None and store.authenticate(None) is None
    with pytest.raises(ValueError):
        store.create("clinic-a")  # a live key exists
    with pytest.raises(ValueError):
        store.create("../etc")
    store.revoke("clinic-a")
    assert KeyFile(tmp_path / "keys.json").authenticate(key) is None
    assert store.authenticate(store.create("clinic-a")) == "clinic-a"  # a new key after revocation


def test_callback_signatures_are_per_key_and_time_bound():
    body = b'{"id":"x"}'
    secret = callback_secret("master", "clinic-a")
    assert secret != callback_secret("master", "clinic-b")
    header = signature_header(secret, body)
    assert verify_signature(secret, body, header)
    assert not verify_signature(callback_secret("master", "clinic-b"), body, header)
    assert not verify_signature(secret, body, signature_header(secret, body, timestamp=1))  # too old
    assert not verify_signature(secret, body, "garbage")


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://127.8.9.10/x", "https://localhost/x", "http://10.1.2.3/",
                                 "http://172.16.0.1/", "http://192.168.0.1/", "http://169.254.169.254/latest",
                                 "http://100.64.0.1/", "http://0.0.0.0/", "http://224.0.0.1/", "http://[::1]/",
                                 "http://[fc00::1]/", "http://[fe80::1]/", "http://[::ffff:10.0.0.1]/",
                                 "http://[::]/", "https://no-such-host.invalid/"])
def test_callback_targets_must_be_public_unless_allowed(url):
    refused = callback_target_refused(url, allow_private=False)
    assert refused and "callback_url" in refused
    if "invalid" not in url:
        assert callback_target_refused(url, allow_private=True) is None


def test_public_callback_targets_pass():
    assert callback_target_refused("https://93.184.215.14/hook", allow_private=False) is None
    assert callback_target_refused("https://[2606:4700::1111]/hook", allow_private=False) is None


def test_the_bot_still_requires_its_token(tmp_path):
    """Workers of an API-only deployment run without TELEGRAM_BOT_TOKEN; the bot refuses to start."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {name: value for name, value in os.environ.items() if name != "TELEGRAM_BOT_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "bot"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "TELEGRAM_BOT_TOKEN" in done.stderr
