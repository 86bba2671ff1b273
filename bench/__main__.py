"""`python -m bench [--json OUT]`: latency, throughput and memory of the pipeline, optimised vs naive.

The naive baseline (eager fp32 PyTorch per model + pytorch-grad-cam GradCAM with a backward pass) and
the optimised path (ONNX Runtime + CAM from the forward pass's features) run in the same process on
the same images, so their ratio is meaningful on whatever machine runs this. Prints a table.
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin after each op and steal the cores from ONNX Runtime in the same process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diagnosis.config import models_dir_from_environment

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["decode", "photo", "preprocess", "gate", "body_part", "chest", "heatmap", "overlay", "total"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def phone_style_jpeg(source: Path) -> bytes:
    """A 1280×960 phone-style JPEG of the example radiograph: full frame, warm cast, sensor noise, q=85."""
    film = Image.open(source).convert("L").resize((1280, 960), Image.Resampling.BICUBIC)
    canvas = np.asarray(film, dtype=np.float32) + np.random.default_rng(0).normal(0, 3, (960, 1280))
    rgb = np.stack([canvas * 1.0, canvas * 0.97, canvas * 0.92], axis=-1).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def time_pipeline(pipeline, data: bytes, runs: int) -> dict[str, list[float]]:
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        pipeline.run(data)
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(runs):
        timings = pipeline.run(data).result.timings_ms
        for stage in STAGES:
            if stage in timings:
                stages[stage].append(timings[stage])
    return stages


def in_process_throughput(pipeline, data: bytes, batch: int, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        pipeline.run_batch([data] * batch)
        done += batch
    return done / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; 0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# One Celery worker process, as compose/k8s run it. "solo": one task at a time, the models on
# TORCH_THREADS=2 (the behaviour before the thread pool). "threads": a thread pool feeding the
# micro-batcher, a backlog runs as batches of 8, two batches in flight (one's decode and overlay
# overlap the other's inference), one intra-op thread per batch.
WORKER_CONFIGS = {
    "solo": {"pool": ["--pool", "solo"], "env": {"TORCH_THREADS": "2"}},
    "threads": {"pool": ["--pool", "threads", "--concurrency", "16"],
                "env": {"TORCH_THREADS": "1", "BATCH_MAX": "8", "BATCH_WAIT_MS": "5", "BATCH_LOOPS": "2"}},
}


def worker_throughput(models: Path, data: bytes, count: int, backend: str, config: str = "solo",
                      device: str = "cpu") -> dict:
    """Images/s through one real Celery worker (queue inference), its peak RSS in MB and its CPU
    time per image (less sensitive to other load on the machine than images/s)."""
    import redis

    from bot.dispatch import diagnose_kwargs
    from contract.envelope import RequestEnvelope
    from contract.keys import DIAGNOSE_TASK, INFERENCE_QUEUE, Keys

    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = dict(os.environ, REDIS_URL=url, MODELS_DIR=str(models), BACKEND=backend, TELEGRAM_BOT_TOKEN="1:bench",  # noqa: S106 - dummy
               TELEGRAM_API_URL="http://127.0.0.1:9", LOG_LEVEL="WARNING", DEVICE=device,
               **WORKER_CONFIGS[config]["env"])
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", INFERENCE_QUEUE,
                               *WORKER_CONFIGS[config]["pool"], "--loglevel", "WARNING", "--without-gossip",
                               "--without-mingle"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from celery import Celery

        app = Celery(broker=url)
        keys = Keys("xso:")

        def send(index: int) -> None:
            request_id = f"bench{index}"
            client.set(keys.blob(request_id), data, ex=600)
            request = RequestEnvelope(request_id=request_id, blob_key=keys.blob(request_id), chat_id=1,
                                      reply_to_message_id=1, language="en")
            app.send_task(DIAGNOSE_TASK, kwargs=diagnose_kwargs(request), queue=INFERENCE_QUEUE)

        send(-1)  # warm-up: wait for the model load and the first answer
        deadline = time.time() + 300
        while client.llen("delivery") < 1 and time.time() < deadline:
            time.sleep(0.05)
        deadline = time.time() + 300
        cpu_before, started = cpu_seconds(worker.pid), time.perf_counter()
        for index in range(count):  # sending is far faster than the worker: it sees a backlog
            send(index)
        while client.llen("delivery") < count + 1 and time.time() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(worker.pid) - cpu_before
        answered = client.llen("delivery") - 1
        rss = 0.0
        for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
        return {"images_per_s": answered / elapsed, "rss_mb": rss, "answered": answered,
                "cpu_ms_per_image": 1000 * cpu / max(answered, 1), "config": config}
    finally:
        worker.terminate()
        worker.wait(30)
        client.flushdb()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--models", type=Path, default=models_dir_from_environment(),
                        help="default: $MODELS_DIR, else the repo's models/")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--worker-images", type=int, default=200)
    parser.add_argument("--no-worker", action="store_true", help="skip the Celery worker measurement")
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="optimised backend")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (use --backend torch with cuda)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from diagnosis.pipeline import Pipeline

    images = {"phone 1280×960 JPEG": phone_style_jpeg(ROOT / "examples" / "chest_xray.jpg"),
              "pack chest 128 px": (ROOT / "examples" / "chest_xray.jpg").read_bytes()}
    optimised = Pipeline.load(args.models, backend=args.backend, heatmap="cam", device=args.device)
    baseline = Pipeline.load(args.models, backend="eager", heatmap="gradcam", device=args.device)
    report: dict = {"machine": machine(), "images": {}}
    print(f"machine: {report['machine']}\n")
    header = f"{'image':22} {'path':10} " + " ".join(f"{s:>10}" for s in STAGES)
    print("p50 latency per stage, ms")
    print(header)
    for name, data in images.items():
        entry = {}
        for label, pipeline in (("baseline", baseline), ("optimised", optimised)):
            stages = time_pipeline(pipeline, data, args.runs)
            entry[label] = {s: {"p50": percentile(v, 50), "p95": percentile(v, 95)} for s, v in stages.items() if v}
            print(f"{name:22} {label:10} " + " ".join(
                f"{entry[label][s]['p50']:10.1f}" if s in entry[label] else f"{'-':>10}" for s in STAGES))
        entry["speedup"] = entry["baseline"]["total"]["p50"] / entry["optimised"]["total"]["p50"]
        report["images"][name] = entry
    phone = report["images"]["phone 1280×960 JPEG"]
    report.update(pipeline_p50_ms=phone["optimised"]["total"]["p50"],
                  pipeline_p95_ms=phone["optimised"]["total"]["p95"],
                  baseline_p50_ms=phone["baseline"]["total"]["p50"], speedup=phone["speedup"])

    pack = images["pack chest 128 px"]
    report["in_process_images_per_s"] = {
        "baseline batch 1": in_process_throughput(baseline, pack, 1, 5),
        "optimised batch 1": in_process_throughput(optimised, pack, 1, 5),
        "optimised batch 8": in_process_throughput(optimised, pack, 8, 5),
    }
    if not args.no_worker:
        report["worker_images_per_s"], report["worker_rss_mb"] = worker_throughput(
            args.models, pack, args.worker_images, args.backend)
    print()
    print(f"{'full pipeline, phone JPEG':40} p50 {report['pipeline_p50_ms']:.1f} ms, "
          f"p95 {report['pipeline_p95_ms']:.1f} ms")
    print(f"{'baseline, same image, same run':40} p50 {report['baseline_p50_ms']:.1f} ms "
          f"→ speedup ×{report['speedup']:.2f}")
    for name, value in report["in_process_images_per_s"].items():
        print(f"{'in-process ' + name:40} {value:.1f} images/s")
    if "worker_images_per_s" in report:
        print(f"{'one Celery worker (solo), pack image':40} {report['worker_images_per_s']:.1f} images/s, "
              f"peak RSS {report['worker_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
