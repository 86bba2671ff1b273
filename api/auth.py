"""API keys: one per client (a clinic, a hospital system), kept hashed in a JSON file.

``python -m api keys create --name clinic-a`` prints a new key once (``xso_`` + 43 random
characters); only its SHA-256 is written (random 256-bit keys need no slow hash). The file
(``API_KEYS_FILE``, mode 0600) survives Redis restarts, which keep nothing on disk; the server
re-reads it when it changes, so a revoked key stops working at the next request. Keys are never
logged: requests are logged and counted by the key's name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from pathlib import Path

from contract.analyses import now_iso

KEY_PREFIX = "xso_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFile:
    """The keys file: ``{"keys": {name: {"sha256", "created_at", "revoked_at"}}}``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, str] = {}

    # ----------------------------------------------------------------- reading (the server)
    def read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("keys", {})
        except FileNotFoundError:
            return {}

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._by_digest = {entry["sha256"]: name for name, entry in self.read().items()
                               if not entry.get("revoked_at")}
            self._stamp = stamp

    def authenticate(self, key: str | None) -> str | None:
        """The name of the client a live key belongs to, else None (constant-time comparison)."""
        if not key or not key.startswith(KEY_PREFIX):
            return None
        self._refresh()
        wanted = digest(key)
        found = None
        for stored, name in self._by_digest.items():
            if hmac.compare_digest(stored, wanted):
                found = name
        return found

    def readable(self) -> bool:
        try:
            self._refresh()
            return True
        except (OSError, ValueError):
            return False

    # ----------------------------------------------------------------- writing (the command)
    def _write(self, keys: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".api-keys-")
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump({"keys": keys}, stream, indent=2, sort_keys=True)
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)

    def create(self, name: str) -> str:
        """A new key for ``name`` (printed once by the command); ValueError if the name is taken."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError("names are 1-64 characters: letters, digits, '.', '_' and '-'")
        keys = self.read()
        if name in keys and not keys[name].get("revoked_at"):
            raise ValueError(f"a live key named {name!r} exists; revoke it first")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        keys[name] = {"sha256": digest(key), "created_at": now_iso(), "revoked_at": None}
        self._write(keys)
        return key

    def revoke(self, name: str) -> None:
        keys = self.read()
        if name not in keys:
            raise ValueError(f"no key named {name!r}")
        keys[name]["revoked_at"] = keys[name].get("revoked_at") or now_iso()
        self._write(keys)
