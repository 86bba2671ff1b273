"""The HTTP API under load, and a worker killed mid-run: every accepted request answered, none twice, no 5xx.

``XSO_API_CLIENTS`` × ``XSO_API_IMAGES`` concurrent requests (default 50 × 4) against a real API and a
real solo worker; part-way through the worker is SIGKILLed and another started. The tasks it held come
back through the broker's visibility timeout (short time limits here make it ~20 s). Also records the
idle-worker latency, POST → result available (printed; README/docs figures come from here).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from model_factory import make_models_dir

from .api_harness import ApiProcess, CallbackReceiver, create_key, pack_chest_film, wait_done
from .conftest import worker_env
from .harness import PACK, WorkerProcess

pytestmark = pytest.mark.slow

CLIENTS = int(os.environ.get("XSO_API_CLIENTS", "50"))
IMAGES = int(os.environ.get("XSO_API_IMAGES", "4"))
SHORT = {"DIAGNOSE_SOFT_TIME_LIMIT_S": "4", "DIAGNOSE_TIME_LIMIT_S": "5", "DELIVER_SOFT_TIME_LIMIT_S": "4",
         "DELIVER_TIME_LIMIT_S": "5"}


def test_concurrent_clients_and_a_killed_worker_lose_nothing(fake_telegram, redis_db, redis_client, tmp_path, pack):
    chest = pack_chest_film(PACK).read_bytes()
    env = {**os.environ, **worker_env(fake_telegram.url, redis_db[0], make_models_dir(tmp_path / "models")), **SHORT,
           "API_KEYS_FILE": str(tmp_path / "keys.json"), "API_RATE_LIMIT": "100000", "API_DAILY_QUOTA": "100000",
           "API_CALLBACK_SECRET": "load-secret", "API_CALLBACK_ALLOW_HTTP": "true",
           "API_CALLBACK_ALLOW_PRIVATE": "true", "API_WATCHDOG_S": "1"}
    key, _ = create_key(env, "load")
    headers = {"Authorization": f"Bearer {key}"}
    first = WorkerProcess(env, tmp_path / "worker-1.log").start()
    api = ApiProcess(env, tmp_path / "api.log").start()
    second = None
    try:
        with httpx.Client(timeout=30) as http:
            # Idle worker: POST → result available, one at a time.
            latencies = []
            for _ in range(20):
                started = time.perf_counter()
                accepted = http.post(api.url + "/v1/analyses", headers=headers, files={"image": ("c.jpg", chest)})
                wait_done(http, api.url + accepted.json()["url"], headers)
                latencies.append(time.perf_counter() - started)
            print(f"\nidle worker, POST → result: p50 {statistics.median(latencies) * 1000:.0f} ms, "
                  f"max {max(latencies) * 1000:.0f} ms (n={len(latencies)})")

        statuses: list[int] = []
        ids: list[str] = []
        lock = threading.Lock()

        def client(_: int) -> None:
            with httpx.Client(timeout=60) as http:
                for _ in range(IMAGES):
                    response = http.post(api.url + "/v1/analyses", headers=headers, files={"image": ("c.jpg", chest)},
                                         data={"callback_url": hook.url})
                    with lock:
                        statuses.append(response.status_code)
                        if response.status_code == 202:
                            ids.append(response.json()["id"])

        with CallbackReceiver() as hook:
            started = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = [pool.submit(client, n) for n in range(CLIENTS)]
                while len(ids) < CLIENTS * IMAGES // 4:
                    time.sleep(0.05)
                first.kill()  # mid-run: tasks queued, one held unacknowledged
                second = WorkerProcess(env, tmp_path / "worker-2.log").start()
                for future in futures:
                    future.result()
            accept_s = time.perf_counter() - started
            with httpx.Client(timeout=30) as http:
                documents = [wait_done(http, f"{api.url}/v1/analyses/{request_id}", headers, timeout=180)
                             for request_id in ids]
            total_s = time.perf_counter() - started
            deadline = time.monotonic() + 30
            while len({h["x-xso-delivery"] for h, _ in hook.calls}) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.2)
            callbacks = [h["x-xso-delivery"] for h, _ in hook.calls]
        print(f"{CLIENTS} clients × {IMAGES}: {len(ids)} accepted in {accept_s:.1f} s "
              f"({len(ids) / accept_s:.0f} POST/s), all answered after {total_s:.1f} s; "
              f"callbacks {len(callbacks)} for {len(set(callbacks))} ids")
        assert statuses.count(202) == CLIENTS * IMAGES and not [s for s in statuses if s >= 500]
        assert len(set(ids)) == len(ids)
        assert all(d["status"] == "succeeded" and d["result"]["outcome"] == "analysed" for d in documents)
        assert set(callbacks) == set(ids)  # every answer reached the client (at least once; by id)
        assert "Traceback" not in api.log()
    finally:
        api.stop()
        first.stop()
        if second is not None:
            second.stop()
