import threading
import time

import pytest

from diagnosis.batching import MicroBatcher


def test_concurrent_submissions_are_batched_and_answered_in_order():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        time.sleep(0.01)
        return [item.upper() for item in items]

    batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=200)
    results = {}

    def client(index):
        results[index] = batcher.submit(f"img{index}".encode())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {i: f"IMG{i}".encode() for i in range(8)}
    assert max(len(c) for c in calls) == 4 and sum(len(c) for c in calls) == 8
    assert len(calls) <= 4  # batched, not one call per image


def test_a_lone_request_waits_at_most_the_window():
    batcher = MicroBatcher(lambda items: items, max_batch=8, max_wait_ms=20)
    started = time.perf_counter()
    assert batcher.submit(b"x") == b"x"
    assert time.perf_counter() - started < 2  # generous: only proves it does not wait for a full batch
    assert batcher.batch_sizes == [1]


def test_errors_reach_every_waiter():
    def broken(items):
        raise RuntimeError("model crashed")

    batcher = MicroBatcher(broken, max_batch=2, max_wait_ms=5)
    with pytest.raises(RuntimeError, match="model crashed"):
        batcher.submit(b"x")
    with pytest.raises(RuntimeError):
        batcher.submit(b"y")  # the batching thread survived
