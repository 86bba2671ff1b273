"""`python -m bench.api_latency [--runs 30] [--backend openvino-bf16] [--json OUT]`: the HTTP API's
end-to-end latency with the shipped models — one image at a time, idle workers, loopback.

The issue's target: "One image, idle worker, loopback: POST → result available p50 ≤ 300 ms". Real
parts, as deployed by docker-compose.yml: ``python -m api`` (uvicorn), one inference worker (``celery
-A worker worker -Q inference --pool solo``, TORCH_THREADS=2) and one delivery worker (``-Q delivery
--pool prefork -c 4``) on a Redis database of its own (claimed like the service tests claim theirs:
an empty one among 2-15, or BENCH_REDIS_URL), no Telegram token (an API-only deployment). Each run
POSTs the image, then polls ``GET /v1/analyses/{id}`` every ``--poll-ms`` until it is ``succeeded``;
the next run starts only after that (the workers are idle when each image arrives). Printed per
image: POST → 202, POST → result available, and the worker's own pipeline time (``timings_ms.total``
from the result), p50 / p95 / max; the CPU and the load average at start and end (on a shared machine
the load matters: compare same-run figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contract.redis_client import claim_empty_db
from contract.settings import BACKENDS

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}; {usable} usable cores of {os.cpu_count()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phone_jpeg() -> bytes:
    from bench.__main__ import phone_style_jpeg

    return phone_style_jpeg(ROOT / "examples" / "chest_xray.jpg")


class Stack:
    """The API and the two workers as subprocesses; logs in a temporary folder (no image bytes are logged)."""

    def __init__(self, env: dict[str, str], folder: Path):
        self.env, self.folder = env, folder
        self.processes: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str) -> None:
        log = (self.folder / f"{name}.log").open("ab")
        self.processes.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT))

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        common = ["-m", "celery", "-A", "worker", "worker", "--without-gossip", "--without-mingle",
                  "--loglevel", "INFO"]
        self.spawn("inference", *common, "-Q", "inference", "--pool", "solo", "-n", "bench-inference@%h")
        self.spawn("delivery", *common, "-Q", "delivery", "--pool", "prefork", "--concurrency", "4",
                   "-n", "bench-delivery@%h")
        self.spawn("api", "-m", "api")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def one_run(http, url: str, headers: dict[str, str], data: bytes, poll_s: float, timeout: float = 120) -> dict:
    started = time.perf_counter()
    response = http.post(url + "/v1/analyses", headers=headers, files={"image": ("chest.jpg", data, "image/jpeg")})
    accepted = time.perf_counter()
    if response.status_code != 202:
        raise RuntimeError(f"POST answered {response.status_code}: {response.text[:300]}")
    location = url + response.json()["url"]
    while time.perf_counter() - started < timeout:
        document = http.get(location, headers=headers).json()
        if document["status"] in ("succeeded", "failed"):
            done = time.perf_counter()
            if document["status"] != "succeeded":
                raise RuntimeError(f"analysis failed: {document.get('error')}")
            return {"post_ms": 1000 * (accepted - started), "total_ms": 1000 * (done - started),
                    "pipeline_ms": float(document["result"]["timings_ms"].get("total", 0.0)),
                    "outcome": f"{document['result'].get('body_part')}/{document['result'].get('verdict')}"}
        time.sleep(poll_s)
    raise RuntimeError("no result within the timeout")


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="the shipped models (default models/)")
    parser.add_argument("--backend", default="openvino-bf16", choices=[b for b in BACKENDS if b != "eager"],
                        help="the CPU workers' backend (docker-compose.yml's default: openvino-bf16)")
    parser.add_argument("--threads", type=int, default=2, help="TORCH_THREADS of the inference worker")
    parser.add_argument("--runs", type=int, default=30, help="images per input, one at a time")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=10.0, help="GET interval while waiting")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    import httpx

    redis_url, redis_client = claim_empty_db(os.environ.get("BENCH_REDIS_URL"))
    inputs = {"examples/chest_xray.jpg": (ROOT / "examples" / "chest_xray.jpg").read_bytes(),
              "phone-style 1280×960 JPEG": phone_jpeg()}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        folder = Path(tmp)
        port = free_port()
        env = {name: value for name, value in os.environ.items() if name != "TELEGRAM_BOT_TOKEN"}
        env.update(REDIS_URL=redis_url, MODELS_DIR=str(args.models.resolve()), BACKEND=args.backend, DEVICE="cpu",
                   TORCH_THREADS=str(args.threads), XRAY_CACHE_DIR=str(folder / "cache"), API_HOST="127.0.0.1",
                   API_PORT=str(port), API_KEYS_FILE=str(folder / "keys.json"), API_RATE_LIMIT="100000",
                   API_DAILY_QUOTA="100000", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        key = subprocess.run([sys.executable, "-m", "api", "keys", "create", "--name", "bench"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()[1].strip()
        headers = {"Authorization": f"Bearer {key}"}
        url = f"http://127.0.0.1:{port}"
        stack = Stack(env, folder)
        load_start = os.getloadavg()
        results: dict[str, dict] = {}
        try:
            stack.start()
            deadline = time.monotonic() + 600
            while "models loaded" not in stack.log("inference") or " ready." not in stack.log("delivery"):
                if time.monotonic() > deadline or any(p.poll() is not None for p in stack.processes):
                    raise RuntimeError("the stack did not start:\n" + stack.log("inference")[-3000:]
                                       + stack.log("api")[-2000:])
                time.sleep(0.2)
            with httpx.Client(timeout=60) as http:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if http.get(url + "/readyz").status_code == 200:
                            break
                    time.sleep(0.2)
                for name, data in inputs.items():
                    for _ in range(args.warmup):
                        one_run(http, url, headers, data, args.poll_ms / 1000)
                    runs = [one_run(http, url, headers, data, args.poll_ms / 1000) for _ in range(args.runs)]
                    results[name] = {field: summary([run[field] for run in runs])
                                     for field in ("post_ms", "total_ms", "pipeline_ms")}
                    results[name]["runs"] = len(runs)
                    results[name]["outcomes"] = sorted({run["outcome"] for run in runs})
        finally:
            stack.stop()
            redis_client.flushdb()
            redis_client.close()
    load_end = os.getloadavg()

    report = {"cpu": cpu_description(), "backend": args.backend, "torch_threads": args.threads,
              "poll_ms": args.poll_ms, "load_average_start": list(load_start), "load_average_end": list(load_end),
              "results": results, "target_p50_ms": 300}
    print(f"HTTP API, one image at a time, idle workers, loopback — {report['cpu']}")
    print(f"backend {args.backend}, TORCH_THREADS={args.threads}, poll every {args.poll_ms:g} ms; "
          f"load average {load_start[0]:.2f} → {load_end[0]:.2f}")
    print()
    print("| input | answer (body part/verdict) | runs | POST → 202 p50 | POST → result p50 | p95 | max | pipeline p50 "
          "| target p50 ≤ 300 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, figures in results.items():
        total = figures["total_ms"]
        verdict = "met" if total["p50"] <= 300 else "missed"
        print(f"| {name} | {', '.join(figures['outcomes'])} | {figures['runs']} | {figures['post_ms']['p50']:.0f} ms | "
              f"{total['p50']:.0f} ms | "
              f"{total['p95']:.0f} ms | {total['max']:.0f} ms | {figures['pipeline_ms']['p50']:.0f} ms | {verdict} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
