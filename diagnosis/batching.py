"""Dynamic micro-batching: gather up to ``max_batch`` images or ``max_wait_ms``, run them as one batch.

A GPU worker runs Celery with a thread pool (``--pool threads --concurrency 16``); each task thread
calls ``submit`` and blocks; one batching thread turns whatever arrived within the window into one
``Pipeline.run_batch`` call. On a CPU batching buys little (``python -m bench``
reports batch 1 and batch 8 throughput), so CPU workers keep ``BATCH_MAX=1`` and call the pipeline
directly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list[bytes]], list[Any]], max_batch: int = 8, max_wait_ms: float = 10):
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self._queue: queue.Queue[tuple[bytes, Future]] = queue.Queue()
        self.batch_sizes: list[int] = []  # observed, for metrics and tests
        threading.Thread(target=self._loop, name="micro-batcher", daemon=True).start()

    def submit(self, data: bytes, timeout: float | None = None) -> Any:
        """Blocks the calling thread until its image's result is ready; re-raises the batch's error."""
        future: Future = Future()
        self._queue.put((data, future))
        return future.result(timeout)

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            self.batch_sizes.append(len(batch))
            try:
                results = self.run_batch([data for data, _ in batch])
            except BaseException as error:  # every waiter must wake up, with the error
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
