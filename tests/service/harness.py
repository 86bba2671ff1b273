"""Real parts for service tests: a Redis database claimed per session, the bot in a thread, a Celery worker.

* ``claim_redis_db``: picks an empty Redis database (2…15) and locks it, so two test sessions on one
  machine (or a developer's session next to CI) never share queues or keys.
* ``BotRunner``: ``build_application(settings)`` driven the way python-telegram-bot documents for
  custom event loops (``async with app: await app.start(); await app.updater.start_polling()``) in a
  background thread.
* ``WorkerProcess``: ``celery -A worker worker -Q inference,delivery --pool solo`` as a subprocess,
  environment pointing at the fake Bot API and a models folder; ready once the models are loaded.
  ``pool="prefork"`` runs it as production does (one child; time limits enforced), ``extra_args``
  adds options such as ``--include tests.service.poison_plugin``.
* ``BotProcess``: ``python -m bot`` as a subprocess (to SIGKILL it, or to keep its log apart).
* ``ServiceProcess``: what the worker, the bot and the API processes share (start until ready, log, stop, kill).
* ``PrivateRedis``: a throw-away ``redis-server`` on a free port (no persistence, a password), for
  tests that kill and restart Redis: never the shared one on 6379.
* ``chat_summary``: what one chat received, sorted into results, overlays, acknowledgements, notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

from contract.redis_client import claim_empty_db
from contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PACK = Path(os.environ.get("XRAY_PACK", ROOT.parent / "shared" / "data" / "xray-pack"))


# --------------------------------------------------------------------------- Redis
def claim_redis_db() -> tuple[str, redis.Redis]:
    """An empty database, locked for this session (``XSO_TEST_REDIS_URL`` when set): ``(url, client)``.
    Raises ``ConnectionError``."""
    return claim_empty_db(os.environ.get("XSO_TEST_REDIS_URL"))


def release_redis_db(client: redis.Redis) -> None:
    if not os.environ.get("XSO_TEST_REDIS_URL"):
        client.flushdb()
    client.close()


def delete_service_keys(client: redis.Redis, prefix: str = "xso:") -> None:
    keys = list(client.scan_iter(f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)


# --------------------------------------------------------------------------- settings
def service_settings(fake_url: str, token: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "TELEGRAM_BOT_TOKEN": token,
        "TELEGRAM_API_URL": fake_url,
        "REDIS_URL": redis_url,
        "HEARTBEAT_FILE": None,
        "POLL_TIMEOUT_S": 1,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


# --------------------------------------------------------------------------- the bot
class BotRunner:
    """The real bot application against the fake Bot API, in its own thread and event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._main_task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name="bot", daemon=True)

    def __enter__(self) -> BotRunner:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("bot did not start within 20 s")
        if self._error is not None:
            raise RuntimeError("bot failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        if self._thread.is_alive():
            # Fail this test only: say where the bot waits, then cancel it, so that a stray bot
            # (still polling, still reading the intake) cannot take the next tests' updates.
            stacks = self._stacks_then_cancel()
            self._thread.join(20)
            raise RuntimeError(f"bot did not stop within 20 s; its tasks were waiting at:\n{stacks}")

    def _stacks_then_cancel(self) -> str:
        async def report() -> str:
            out = io.StringIO()
            for task in asyncio.all_tasks():
                if task is asyncio.current_task():
                    continue
                out.write(f"--- {task.get_name()}\n")
                awaiting = task.get_coro()  # follow the awaits down to where the task waits
                while awaiting is not None and getattr(awaiting, "cr_frame", None) is not None:
                    frame = awaiting.cr_frame
                    out.write(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
                    awaiting = getattr(awaiting, "cr_await", None)
            if self._main_task is not None:
                self._main_task.cancel()
            return out.getvalue()

        try:
            return asyncio.run_coroutine_threadsafe(report(), self._loop).result(10)
        except Exception as error:  # the loop itself is blocked (a synchronous call in a coroutine)
            return f"(no report: {type(error).__name__}; the event loop thread itself is blocked)"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # surfaced by __enter__
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        from bot.app import ALLOWED_UPDATES, build_application

        self._loop = asyncio.get_running_loop()
        self._main_task = asyncio.current_task()
        self._stop = asyncio.Event()
        application = build_application(self.settings)
        async with application:  # initialize … shutdown
            await application.post_init(application)  # what run_polling would do
            await application.start()
            await application.updater.start_polling(
                timeout=timedelta(seconds=1), allowed_updates=ALLOWED_UPDATES, poll_interval=0
            )
            self._ready.set()
            await self._stop.wait()
            await application.updater.stop()
            await application.stop()
            await application.post_stop(application)
        await application.post_shutdown(application)


# --------------------------------------------------------------------------- services as processes
class ServiceProcess:
    """A service as a subprocess with its output in a log file: started and waited for until ``ready()``
    (``failed()``: give up at once), stopped with SIGTERM (SIGKILL after ``stop_wait_s``), or killed.
    The worker, the bot and the HTTP API (``api_harness.ApiProcess``) are each one of these."""

    name = "service"
    stop_wait_s = 20.0

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def _launch(self, command: list[str], env: dict[str, str], timeout: float, ready: Any,
                failed: Any = None, poll_s: float = 0.2) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if (failed is not None and failed()) or self.process.poll() is not None:
                break
            time.sleep(poll_s)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready; log:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL to the real PID (no shell in between): no warm shutdown, no acknowledgements."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # a warm shutdown
            try:
                self.process.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        with contextlib.suppress(Exception):
            self._log.close()


# --------------------------------------------------------------------------- the worker
class WorkerProcess(ServiceProcess):
    """A real Celery worker subprocess (solo pool), started once per module or session.
    ``XSO_WORKER_POOL=threads`` runs the solo ones as the batched thread-pool worker instead."""

    name = "worker"

    def __init__(self, env: dict[str, str], log_path: Path, queues: str = "inference,delivery",
                 pool: str = "solo", extra_args: tuple[str, ...] = ()):
        super().__init__(env, log_path)
        self.queues = queues
        self.pool = pool
        self.extra_args = tuple(extra_args)

    def start(self, timeout: float = 120.0, wait_for_models: bool = True) -> WorkerProcess:
        env = {**os.environ, **self.env}
        pool, concurrency = self.pool, "1"
        if os.environ.get("XSO_WORKER_POOL") == "threads" and pool == "solo":
            # The batched CPU worker (docs/performance.md): a thread pool feeding the micro-batcher.
            pool, concurrency = "threads", "8"
            env.update(BATCH_MAX="8", BATCH_WAIT_MS="5", BATCH_LOOPS="2", TORCH_THREADS="1")
        command = [
            sys.executable, "-m", "celery", "-A", "worker", "worker",
            "-Q", self.queues, "--pool", pool, "--concurrency", concurrency,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"test-{uuid.uuid4().hex[:8]}@%h", "--loglevel", "INFO", *self.extra_args,
        ]
        def ready() -> bool:
            text = self.log()
            return " ready." in text and ("models loaded" in text or not wait_for_models)

        self._launch(command, env, timeout, ready=ready, failed=lambda: "loading the models failed" in self.log())
        return self


# --------------------------------------------------------------------------- the bot as a process
class BotProcess(ServiceProcess):
    """``python -m bot`` against the fake; ready once it long-polls. ``kill()`` is a SIGKILL."""

    name = "bot"
    stop_wait_s = 30.0

    def start(self, fake: Any, timeout: float = 60.0, ready: Any = None) -> BotProcess:
        """Ready once it long-polls (or once ``ready()`` is true, e.g. a webhook was registered)."""
        started = time.monotonic()
        env = {**os.environ, "HEARTBEAT_FILE": "", "POLL_TIMEOUT_S": "1", **self.env}
        self._launch([sys.executable, "-m", "bot"], env, timeout, poll_s=0.1, ready=ready or (
            lambda: any(call.at >= started for call in fake.calls_of("getUpdates"))))
        return self


# --------------------------------------------------------------------------- a private Redis
def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """``redis-server --port <free> --save "" --appendonly no --requirepass <random>``: kill and restart it freely."""

    def __init__(self, work_dir: Path, port: int | None = None):
        self.work_dir = Path(work_dir)
        self.port = port or free_port()
        self.password = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self, timeout: float = 20.0) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--requirepass", self.password, "--dir", str(self.work_dir), "--loglevel", "warning"]
        log = (self.work_dir / "redis.log").open("ab")
        # A local name: a test's kill() from another thread may reset self.process meanwhile.
        self.process = process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                client = self.client()
                try:
                    if client.ping():
                        return self
                finally:
                    client.close()
            if process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: everything it held (queues, images, marks) is gone, as after a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


# --------------------------------------------------------------------------- what a chat received
@dataclass
class ChatSummary:
    results: list[str]  # final answers: readings and apologies (physician prompt), early exits, rejections
    photos: int  # overlays: sendPhoto calls plus every photo of an album (sendMediaGroup)
    overlay_sends: int  # overlay deliveries: one per sendPhoto or sendMediaGroup (an album is one part)
    acks: int  # "Received, analysing…"
    notices: list[str]  # "please send it again"-style texts (edited acknowledgement or a new message)

    @property
    def told_to_resend(self) -> bool:
        return bool(self.notices)


RESEND_HINTS = ("send it again", "try again")  # English: the fault tests talk English


def chat_summary(fake: Any, chat_id: int, language: str = "en") -> ChatSummary:
    from contract.texts import translator
    from diagnosis.messages import PHYSICIAN, gettext_for

    physician = gettext_for(language)(PHYSICIAN)
    texts = fake.texts_to(chat_id)
    openings = non_result_openings(language)
    results = [t for t in texts if physician in t or t.split("\n", 1)[0] in openings]
    acks = [t for t in texts if t.startswith(translator(language)[0]("Received, analysing…"))]
    edits = [str(c.params.get("text", "")) for c in fake.calls_of("editMessageText", chat_id)]
    notices = [t for t in texts + edits if t not in results and any(h in t for h in RESEND_HINTS)]
    singles, albums = fake.calls_of("sendPhoto", chat_id), fake.calls_of("sendMediaGroup", chat_id)
    photos = len(singles) + len(fake.album_photos(chat_id))
    return ChatSummary(results, photos, len(singles) + len(albums), len(acks), notices)


def non_result_openings(language: str) -> set[str]:
    """First lines of every reply that gives no reading (refusals, retakes, parts not analysed): they
    carry no physician prompt (diagnosis.messages), so they are told apart by how they open."""
    from diagnosis.intake import ImageRejected
    from diagnosis.messages import BODY_PARTS, MODALITIES, render_reply
    from diagnosis.report import DiagnosisResult

    results = [DiagnosisResult(outcome="rejected", rejection=code) for code in ImageRejected.CODES]
    results += [DiagnosisResult(outcome="not_xray", modality=m) for m in [None, "non_medical", *MODALITIES]]
    results += [DiagnosisResult(outcome="body_part_not_analysed", body_part=part) for part in BODY_PARTS]
    results += [DiagnosisResult(outcome=o) for o in ("body_part_unknown", "body_part_uncertain")]
    results += [DiagnosisResult(outcome="retake", retake=["blurred"], photographed=p) for p in (False, True)]
    return {render_reply(r, language).split("\n", 1)[0] for r in results}


# --------------------------------------------------------------------------- images
def sample_image(kind: str) -> bytes:
    """A real image from the data pack (chest / hand radiograph, natural photo), else a synthetic one."""
    column, value = {"chest": (4, "chest"), "hand": (4, "hand"), "natural": (7, "natural_photo")}[kind]
    manifest = PACK / "manifest.csv"
    if manifest.is_file():
        with manifest.open(encoding="utf-8") as handle:
            next(handle)
            for line in handle:
                fields = line.rstrip("\n").split(",")
                if fields[column] == value and fields[7] in ("radiograph", "natural_photo"):
                    return (PACK / fields[0]).read_bytes()
    rng = np.random.default_rng(0)
    if kind == "natural":
        pixels = rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        ramp = np.tile(np.linspace(0, 255, 200), (160, 1)).astype(np.uint8)
        image = Image.fromarray(ramp, "L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
