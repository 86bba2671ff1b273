"""Real parts for the HTTP API tests: ``python -m api`` as a subprocess, its keys command, a callback receiver.

* ``ApiProcess``: the API server (uvicorn) on a free loopback port, ready once ``/readyz`` answers.
* ``create_key`` / ``revoke_key``: the real ``python -m api keys`` command against a keys file.
* ``CallbackReceiver``: a loopback HTTP server that records every POST (body and headers) and answers
  with the statuses it is told to (e.g. 500 twice, then 200: the retries).
"""

from __future__ import annotations

import contextlib
import csv
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .harness import ROOT, ServiceProcess, free_port


def pack_chest_film(pack: Path) -> Path:
    """The first chest radiograph of the pack's test split (sharp enough to be analysed, not retaken)."""
    with (pack / "manifest.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test" and row["body_part"] == "chest" and row["kind"] == "radiograph":
                return pack / row["path"]
    raise FileNotFoundError("no chest radiograph in the pack's test split")


def api_command(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "api", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def create_key(env: dict[str, str], name: str) -> tuple[str, str | None]:
    """(the key, the callback signing secret or None) as ``python -m api keys create`` prints them."""
    lines = api_command(env, "keys", "create", "--name", name).splitlines()
    key = lines[1].strip()
    secret = lines[3].strip() if len(lines) >= 4 else None
    return key, secret


def revoke_key(env: dict[str, str], name: str) -> None:
    api_command(env, "keys", "revoke", "--name", name)


class ApiProcess(ServiceProcess):
    """``python -m api`` (uvicorn) on a free loopback port; ready once ``/readyz`` answers 200."""

    name = "the API"

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__(dict(env), log_path)
        self.port = int(self.env.setdefault("API_PORT", str(free_port())))
        self.env.setdefault("API_HOST", "127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        return False

    def start(self, timeout: float = 60.0) -> ApiProcess:
        self._launch([sys.executable, "-m", "api"], self.env, timeout, ready=self.ready)
        return self


class CallbackReceiver:
    """Records POSTs; ``statuses`` is the queue of answers (then 200 forever)."""

    def __init__(self):
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> CallbackReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def for_id(self, analysis_id: str) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return [(h, b) for h, b in self.calls if h.get("x-xso-delivery") == analysis_id]


def wait_done(client: httpx.Client, url: str, headers: dict[str, str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        document = client.get(url, headers=headers).json()
        if document.get("status") in ("succeeded", "failed"):
            return document
        time.sleep(0.05)
    raise AssertionError(f"{url} not finished within {timeout}s")
