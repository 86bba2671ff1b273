"""HTTP API parts without services: the page's catalogs, the keys file, callback signatures."""

from __future__ import annotations

import json
import stat

import pytest
from babel.messages.extract import extract_from_dir

from api.auth import KeyFile
from api.texts import gettext_for, page_texts
from contract.analyses import callback_secret, callback_target_refused, signature_header, verify_signature


@pytest.mark.parametrize("language", ["ru", "kk"])
def test_web_catalog_translates_every_page_text(language):
    _ = gettext_for(language)
    found = {m[2] for m in extract_from_dir("api", keywords={"N_": None, "_": None}) if isinstance(m[2], str)}
    assert found, "no texts extracted"
    assert [m for m in found if _(m) == m] == []
    texts = page_texts(language)
    assert texts["physician"] and texts["findings"]["Effusion"] != "Pleural effusion"


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
