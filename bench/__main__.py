"""`python -m bench [--json OUT] [--device cuda] [--quick]`: latency, throughput and memory of the
pipeline, optimised vs naive, and of the workers.

The naive baseline (eager fp32 PyTorch per model + pytorch-grad-cam GradCAM with a backward pass) and
the optimised path (ONNX Runtime, or torch on CUDA, + CAM from the forward pass's features) run in the
same process on the same images, so their ratio is meaningful on whatever machine runs this. Then:
each model alone per backend (torch / onnx / openvino) at batch 1 and 8; the model stage alone and the
micro-batcher fed by concurrent producers (the GPU worker's path: batch 1/8/32/128 on CUDA, 1/8 on the
CPU); one real Celery worker in two configurations (solo, and a thread pool feeding the batcher).
The load average is recorded at start and end: on a shared machine compare same-run ratios.
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

from diagnosis.config import BACKENDS, models_dir_from_environment

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
# With --device cuda the threaded worker runs as worker-gpu does (docker-compose.yml).
GPU_THREADS = {"pool": ["--pool", "threads", "--concurrency", "128"],
               "env": {"BATCH_MAX": "32", "BATCH_WAIT_MS": "5", "BATCH_LOOPS": "4"}}


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
    spec = GPU_THREADS if config == "threads" and device.startswith("cuda") else WORKER_CONFIGS[config]
    env = dict(os.environ, REDIS_URL=url, MODELS_DIR=str(models), BACKEND=backend, TELEGRAM_BOT_TOKEN="1:bench",  # noqa: S106 - dummy
               TELEGRAM_API_URL="http://127.0.0.1:9", LOG_LEVEL="WARNING", DEVICE=device, **spec["env"])
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", INFERENCE_QUEUE,
                               *spec["pool"], "--loglevel", "WARNING", "--without-gossip",
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


def model_latency(models: Path, backends: list[str], device: str, batches: tuple[int, ...], runs: int,
                  threads: int | None) -> dict:
    """p50 ms per batch of each model alone, per backend and batch size (random input of the model's size)."""
    import torch

    from diagnosis.backends import make_runner
    from diagnosis.cards import discover
    from diagnosis.config import cache_dir_from_environment
    from diagnosis.network import load_model

    result: dict = {}
    for backend in backends:
        result[backend] = {}
        for folder, card in sorted(discover(models).values(), key=lambda fc: fc[1].name):
            _, network = load_model(folder, torch.device(device))
            runner = make_runner(backend, network, card, torch.device(device), cache_dir_from_environment(), threads)
            size = card.input.size
            result[backend][card.name] = {}
            for batch in batches:
                x = np.random.default_rng(0).normal(size=(batch, card.input.channels, size, size)).astype(np.float32)
                for _ in range(2):
                    runner(x)
                times = []
                for _ in range(runs):
                    clock = time.perf_counter()
                    runner(x)
                    times.append((time.perf_counter() - clock) * 1000)
                result[backend][card.name][f"batch {batch}"] = percentile(times, 50)
    return result


def model_stage_images_per_s(pipeline, batches: tuple[int, ...], seconds: float) -> dict[str, float]:
    """Images/s of the model stage alone (gate, body part and chest on every image), per batch size:
    what the accelerator sustains when decode and overlay are off its path."""
    models = [pipeline.gate, pipeline.body_part, *pipeline.abnormality.values()][:3]
    result = {}
    for batch in batches:
        inputs = [np.random.default_rng(0).normal(size=(batch, m.card.input.channels, m.card.input.size,
                                                          m.card.input.size)).astype(np.float32) for m in models]
        for model, x in zip(models, inputs, strict=True):  # warm-up: kernels, graphs, bucket shapes
            model.runner(x)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for model, x in zip(models, inputs, strict=True):
                model.runner(x)
            done += batch
        result[str(batch)] = done / (time.perf_counter() - started)
    return result


def batched_end_to_end(pipeline, data: bytes, producers: int, max_batch: int, loops: int, seconds: float) -> dict:
    """The worker's batching path in-process: ``producers`` threads each submit one image at a time
    (as Celery's thread pool does) to one MicroBatcher; images/s over ``seconds`` and the mean batch."""
    import threading

    from diagnosis.batching import MicroBatcher

    batcher = MicroBatcher(pipeline.run_batch, max_batch=max_batch, max_wait_ms=5, loops=loops)
    batcher.submit(data)
    batcher.batch_sizes.clear()
    done, lock = [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def produce() -> None:
        while time.perf_counter() < stop:
            batcher.submit(data)
            with lock:
                done[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=produce, daemon=True) for _ in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sizes = batcher.batch_sizes
    return {"images_per_s": done[0] / (time.perf_counter() - started), "producers": producers,
            "max_batch": max_batch, "loops": loops, "mean_batch": float(np.mean(sizes)) if sizes else 0.0}


def default_cpu_backend() -> str:
    """OpenVINO at bf16 where it is installed (the CPU worker's default), else ONNX Runtime."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "onnx"
    return "openvino-bf16"


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--models", type=Path, default=models_dir_from_environment(),
                        help="default: $MODELS_DIR, else the repo's models/")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--worker-images", type=int, default=None, help="default 200 (CPU), 3000 (CUDA)")
    parser.add_argument("--no-worker", action="store_true", help="skip the Celery worker measurements")
    parser.add_argument("--backend", default=None, choices=[b for b in BACKENDS if b != "eager"],
                        help="optimised backend (default: openvino-bf16 on the CPU, else onnx; torch on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA runs the torch backend)")
    parser.add_argument("--seconds", type=float, default=5, help="length of each throughput measurement")
    parser.add_argument("--producers", type=int, default=None,
                        help="concurrent producers of the batched end-to-end measurement (default 8 CPU, 64 CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    backend = args.backend or ("torch" if cuda else default_cpu_backend())
    args.worker_images = args.worker_images or (3000 if cuda else 200)
    if args.quick:
        args.runs, args.worker_images, args.seconds = 2, 8, 0.5
    batches = (1, 8, 32, 128) if cuda else (1, 8)
    producers = args.producers or (64 if cuda else 8)

    from diagnosis.pipeline import Pipeline

    images = {"phone 1280×960 JPEG": phone_style_jpeg(ROOT / "examples" / "chest_xray.jpg"),
              "pack chest 128 px": (ROOT / "examples" / "chest_xray.jpg").read_bytes()}
    report: dict = {"machine": machine(), "device": args.device, "backend": backend,
                    "load_average": {"start": load_average()}, "images": {}}
    print(f"machine: {report['machine']}\nload average (1, 5, 15 min) at start: {report['load_average']['start']}\n")
    optimised = Pipeline.load(args.models, backend=backend, heatmap="cam", device=args.device)
    baseline = Pipeline.load(args.models, backend="eager", heatmap="gradcam", device=args.device)
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
    del baseline

    backends = ["torch"] if cuda else [b for b in BACKENDS if b != "eager"]
    report["model_latency_ms"] = model_latency(args.models, backends, args.device, batches[:2],
                                               max(args.runs // 2, 2), None)
    print("\np50 ms per batch, each model alone")
    for name, per_model in report["model_latency_ms"].items():
        for model, values in per_model.items():
            print(f"  {name:10} {model:12} " + "  ".join(f"{k} {v:7.1f}" for k, v in values.items()))

    pack = images["pack chest 128 px"]
    report["in_process_images_per_s"] = {
        "optimised batch 1": in_process_throughput(optimised, pack, 1, args.seconds),
        "optimised batch 8": in_process_throughput(optimised, pack, 8, args.seconds),
    }
    # The GPU worker's path (on the CPU with small sizes): model stage alone, then one batcher fed by
    # concurrent producers, decode and overlay included.
    report["model_stage_images_per_s"] = model_stage_images_per_s(optimised, batches, args.seconds)
    report["batched_end_to_end"] = batched_end_to_end(optimised, pack, producers, batches[-1] if cuda else 8,
                                                      1 if cuda else 2, args.seconds * 2)
    print()
    print("model stage alone (gate + body part + chest), images/s: " + ", ".join(
        f"batch {k} {v:.0f}" for k, v in report["model_stage_images_per_s"].items()))
    e2e = report["batched_end_to_end"]
    print(f"batcher end to end, {e2e['producers']} producers: {e2e['images_per_s']:.1f} images/s "
          f"(mean batch {e2e['mean_batch']:.1f}, up to {e2e['max_batch']}, {e2e['loops']} loops)")
    del optimised

    if not args.no_worker:
        report["workers"] = {}
        for config in WORKER_CONFIGS:
            report["workers"][config] = worker_throughput(args.models, pack, args.worker_images, backend, config,
                                                          args.device)
        # The deployed default (solo / one prefork child) keeps the old keys; the batched thread-pool
        # worker gets its own, with the same-run ratio.
        solo, threads = report["workers"]["solo"], report["workers"]["threads"]
        report["worker_images_per_s"], report["worker_rss_mb"] = solo["images_per_s"], solo["rss_mb"]
        report["worker_threads_images_per_s"], report["worker_threads_rss_mb"] = threads["images_per_s"], \
            threads["rss_mb"]
        report["worker_threads_vs_solo"] = threads["images_per_s"] / solo["images_per_s"]
    report["load_average"]["end"] = load_average()
    print()
    print(f"{'full pipeline, phone JPEG':40} p50 {report['pipeline_p50_ms']:.1f} ms, "
          f"p95 {report['pipeline_p95_ms']:.1f} ms")
    print(f"{'baseline, same image, same run':40} p50 {report['baseline_p50_ms']:.1f} ms "
          f"→ speedup ×{report['speedup']:.2f}")
    for name, value in report["in_process_images_per_s"].items():
        print(f"{'in-process ' + name:40} {value:.1f} images/s")
    for config, value in report.get("workers", {}).items():
        print(f"{'one Celery worker (' + config + '), pack image':40} {value['images_per_s']:.1f} images/s, "
              f"{value['cpu_ms_per_image']:.1f} CPU ms/image, peak RSS {value['rss_mb']:.0f} MB")
    if "worker_threads_vs_solo" in report:
        print(f"{'threads vs solo, same run':40} ×{report['worker_threads_vs_solo']:.2f}")
    print(f"load average at end: {report['load_average']['end']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
