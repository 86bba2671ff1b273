"""Load test: K simulated users send images through the fake Bot API to the real bot, Redis and worker.

    python -m tests.load --users 100 --images 5                # 500 requests; JSON to /tmp
    python -m tests.load --users 20 --images 3 --chaos 0.3     # with 30 % of sends failing (429/5xx)
    python -m tests.load --users 50 --images 2 --workers 2 --json /tmp/load.json

Parts: ``FakeTelegram`` (tests/service/fake_telegram.py) in this process; ``python -m bot`` and
``celery -A worker worker --pool solo`` as subprocesses (tests/service/harness.py); Redis: a free
test database on 127.0.0.1:6379 (or ``XSO_TEST_REDIS_URL``). The worker runs the small
random-weight stand-in models of tests/model_factory.py (64 px DenseNet-121s), so the numbers
measure the service (Telegram round trips, Redis, Celery, delivery), not the production models.

Each user is a closed loop: send an image, wait for the complete answer (findings text and heat
map), think ``--think`` seconds, send the next. Reported: requests, answered, lost (no answer
within ``--timeout`` s of the last progress), duplicated (more than one findings text or heat map
for one image), latency from sending to the findings text and to the heat map (p50/p95/max), and
throughput. Exit status 1 if anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # model_factory, service.* (also under `python -m tests.load`)

TOKEN = "123456:LOAD-TEST-TOKEN"
FIRST_USER = 5_000_000


@dataclass
class Request:
    user: int
    message_id: int
    sent_at: float
    texts: list[float] = field(default_factory=list)  # seconds from sending to each findings text
    photos: list[float] = field(default_factory=list)  # … to each heat map

    @property
    def complete(self) -> bool:
        return bool(self.texts and self.photos)


@dataclass
class User:
    user_id: int
    remaining: int
    due: float = 0.0
    current: Request | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 3)


def summarise(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "max": round(max(values), 3) if values else None,
            "mean": round(statistics.fmean(values), 3) if values else None}


def drive(fake: Any, image: bytes, users: int, images: int, think_s: float, timeout_s: float,
          physician: str) -> tuple[list[Request], float]:
    """Run the closed-loop users against the fake; returns every request and the wall time."""
    people = [User(FIRST_USER + index, images) for index in range(users)]
    by_message: dict[tuple[int, int], Request] = {}
    requests: list[Request] = []
    position = len(fake.calls)

    def record(calls: list[Any]) -> bool:
        progress = False
        for call in calls:
            if call.status != 200 or call.method not in ("sendMessage", "sendPhoto", "sendMediaGroup"):
                continue
            reply = call.params.get("reply_parameters") or {}
            request = by_message.get((call.chat_id, reply.get("message_id")))
            if request is None:
                continue
            if call.method in ("sendPhoto", "sendMediaGroup"):  # one overlay, or an album of them
                request.photos.append(call.at - request.sent_at)
                progress = True
            elif physician in str(call.params.get("text", "")):
                request.texts.append(call.at - request.sent_at)
                progress = True
        return progress

    started = last_progress = time.monotonic()
    while True:
        now = time.monotonic()
        for person in people:
            if person.current is None and person.remaining and now >= person.due:
                message = fake.inject_photo(person.user_id, image)
                request = Request(person.user_id, message["message_id"], time.monotonic())
                person.current, person.remaining = request, person.remaining - 1
                by_message[(person.user_id, request.message_id)] = request
                requests.append(request)
        calls, position = fake.calls_since(position)
        if record(calls):
            last_progress = time.monotonic()
        for person in people:
            if person.current is not None and person.current.complete:
                person.current, person.due = None, time.monotonic() + think_s
        if all(p.current is None and not p.remaining for p in people):
            break
        if time.monotonic() - last_progress > timeout_s:
            break
        time.sleep(0.02)
    wall = time.monotonic() - started
    time.sleep(3.0)  # duplicates would arrive now
    record(fake.calls_since(position)[0])
    return requests, wall


def report(requests: list[Request], wall: float, config: dict[str, Any]) -> dict[str, Any]:
    answered = [r for r in requests if r.texts]
    text_latency = [r.texts[0] for r in answered]
    photo_latency = [r.photos[0] for r in requests if r.photos]
    return {
        **config,
        "requests": len(requests),
        "answered": len(answered),
        "lost": len(requests) - len(answered),
        "duplicated": sum(len(r.texts) > 1 or len(r.photos) > 1 for r in requests),
        "missing_heat_map": sum(bool(r.texts) and not r.photos for r in requests),
        "wall_s": round(wall, 1),
        "throughput_per_s": round(len(answered) / wall, 2) if wall else None,
        "latency_text_s": summarise(text_latency),
        "latency_heat_map_s": summarise(photo_latency),
    }


def run_load(users: int, images: int, *, think_s: float = 0.0, timeout_s: float = 300.0, workers: int = 1,
             chaos: float = 0.0, fake: Any = None, redis_url: str | None = None,
             work_dir: Path | None = None) -> dict[str, Any]:
    """Start what is missing (fake, Redis database, worker(s), bot), drive the users, stop, report."""
    from model_factory import make_models_dir
    from service.fake_telegram import FakeTelegram
    from service.harness import BotProcess, WorkerProcess, claim_redis_db, delete_service_keys, release_redis_db

    from contract.keys import DELIVERY_QUEUE, INFERENCE_QUEUE
    from diagnosis.messages import PHYSICIAN, gettext_for

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="xso-load-"))
    own_fake = fake is None
    if own_fake:
        fake = FakeTelegram(TOKEN).start()
    token = fake.token
    claimed = None
    if redis_url is None:
        redis_url, claimed = claim_redis_db()
    started_processes: list[Any] = []
    try:
        if claimed is not None:
            delete_service_keys(claimed)
            claimed.delete(INFERENCE_QUEUE, DELIVERY_QUEUE)
        models = make_models_dir(work_dir / "models")
        env = {"TELEGRAM_BOT_TOKEN": token, "TELEGRAM_API_URL": fake.url, "REDIS_URL": redis_url,
               "MODELS_DIR": str(models), "DEVICE": "cpu", "TORCH_THREADS": str(max(1, 2 // workers)),
               "LOG_LEVEL": "INFO", "RATE_LIMIT_IMAGES": str(max(10, images))}
        for index in range(workers):
            started_processes.append(WorkerProcess(env, work_dir / f"worker-{index}.log").start())
        bot = BotProcess(env, work_dir / "bot.log").start(fake)
        started_processes.append(bot)
        if chaos:
            fake.chaos(chaos, statuses=(429, 429, 500, 502, 503), retry_after=(1, 2, 3))
        from service.harness import sample_image

        physician = gettext_for("en")(PHYSICIAN)
        requests, wall = drive(fake, sample_image("chest"), users, images, think_s, timeout_s, physician)
        if chaos:
            fake.chaos(0)
    finally:
        for process in reversed(started_processes):
            process.stop()
        if claimed is not None:
            release_redis_db(claimed)
        if own_fake:
            fake.stop()
    config = {"users": users, "images_per_user": images, "think_s": think_s, "workers": workers, "chaos": chaos,
              "models": "tests/model_factory.py stand-ins (64 px, random weights)", "logs": str(work_dir),
              "cpu_count": os.cpu_count()}
    return report(requests, wall, config)


def print_report(result: dict[str, Any]) -> None:
    text, photo = result["latency_text_s"], result["latency_heat_map_s"]
    print(f"{result['users']} users × {result['images_per_user']} images = {result['requests']} requests "
          f"({result['workers']} worker(s), chaos {result['chaos']:.0%}, models: {result['models']})")
    print(f"  answered {result['answered']}, lost {result['lost']}, duplicated {result['duplicated']}, "
          f"missing heat map {result['missing_heat_map']}")
    print(f"  wall {result['wall_s']}s, throughput {result['throughput_per_s']} answers/s")
    print(f"  latency to findings: p50 {text['p50']}s, p95 {text['p95']}s, max {text['max']}s")
    print(f"  latency to heat map: p50 {photo['p50']}s, p95 {photo['p95']}s, max {photo['max']}s")
    print(f"  logs: {result['logs']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--images", type=int, default=5, help="images per user")
    parser.add_argument("--think", type=float, default=0.0, help="seconds between an answer and the next image")
    parser.add_argument("--workers", type=int, default=1, help="solo-pool inference+delivery workers")
    parser.add_argument("--chaos", type=float, default=0.0, help="share of sends answered 429/5xx")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this long without progress")
    parser.add_argument("--json", type=Path, help="where to write the report (default /tmp/xso-load-<u>x<i>.json)")
    args = parser.parse_args(argv)
    result = run_load(args.users, args.images, think_s=args.think, timeout_s=args.timeout, workers=args.workers,
                      chaos=args.chaos)
    print_report(result)
    path = args.json or Path(tempfile.gettempdir()) / f"xso-load-{args.users}x{args.images}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"  report: {path}")
    return 1 if result["lost"] or result["duplicated"] else 0


if __name__ == "__main__":
    sys.exit(main())
