"""Dynamic micro-batching: gather up to ``max_batch`` images or ``max_wait_ms``, run them as one batch.

A worker runs Celery with a thread pool (``--pool threads --concurrency 16``); each task thread
calls ``submit`` and blocks; batching threads turn whatever arrived within the window into one
``Pipeline.run_batch`` call each. A queue's backlog thus runs as batches (one forward pass per model
for up to ``max_batch`` images). With ``loops=2`` two batches are in flight at once, so one batch's
decode, photo step and overlay (CPU work outside the models) overlap the other's inference: on a
2-core CPU worker that is most of the gain (``python -m bench`` measures both). A GPU worker uses
one loop and large batches.

A waiter that gives up (``submit(timeout=…)``, the task's soft time limit) cancels its image: a
batch formed later skips it, so nothing is computed for an answer nobody will send.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list[bytes]], list[Any]], max_batch: int = 8, max_wait_ms: float = 10,
                 loops: int = 1, on_loop_start: Callable[[], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        if loops < 1:
            raise ValueError("loops must be ≥ 1")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self._queue: queue.Queue[tuple[bytes, Future]] = queue.Queue()
        self._take = threading.Lock()  # one loop gathers a batch at a time: batches fill up
        self.batch_sizes: list[int] = []  # observed, for metrics and tests
        self.on_loop_start = on_loop_start  # e.g. per-thread intra-op settings
        for index in range(loops):
            threading.Thread(target=self._loop, name=f"micro-batcher-{index}", daemon=True).start()

    def submit(self, data: bytes, timeout: float | None = None) -> Any:
        """Blocks the calling thread until its image's result is ready; re-raises the batch's error.
        Past ``timeout`` seconds raises ``concurrent.futures.TimeoutError`` (the image is dropped if
        its batch has not started yet)."""
        future: Future = Future()
        self._queue.put((data, future))
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise

    def _gather(self) -> list[tuple[bytes, Future]]:
        with self._take:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:  # a backlog is taken at once; otherwise wait up to the window
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        return [(data, future) for data, future in batch if future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        if self.on_loop_start is not None:
            self.on_loop_start()
        while True:
            batch = self._gather()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = self.run_batch([data for data, _ in batch])
            except BaseException as error:  # every waiter must wake up, with the error
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
