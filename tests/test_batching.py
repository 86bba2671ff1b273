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


def test_two_loops_overlap_batches_and_keep_answers_apart():
    running, peak, lock = [0], [0], threading.Lock()

    def run_batch(items):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return [item[::-1] for item in items]

    batcher = MicroBatcher(run_batch, max_batch=2, max_wait_ms=1, loops=2)
    results = {}

    def client(index):
        results[index] = batcher.submit(f"ab{index}".encode())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {i: f"{i}ba".encode() for i in range(8)}
    assert peak[0] == 2  # two batches ran at the same time
    assert sum(batcher.batch_sizes) == 8 and max(batcher.batch_sizes) == 2


def test_a_backlog_runs_as_full_batches():
    gate = threading.Event()
    calls = []

    def run_batch(items):
        gate.wait(5)
        calls.append(len(items))
        return items

    batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=0)
    threads = [threading.Thread(target=batcher.submit, args=(b"x",)) for _ in range(9)]
    threads[0].start()
    time.sleep(0.1)  # the first image's batch is running (and blocked); eight wait behind it
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert calls == [1, 4, 4]  # the backlog was taken in full batches, even with no wait window


def test_a_timed_out_image_is_not_computed():
    from concurrent.futures import TimeoutError as FutureTimeout

    gate = threading.Event()
    seen = []

    def run_batch(items):
        seen.extend(items)
        gate.wait(5)
        return items

    batcher = MicroBatcher(run_batch, max_batch=1, max_wait_ms=0)
    first = threading.Thread(target=batcher.submit, args=(b"first",))
    first.start()
    time.sleep(0.1)
    with pytest.raises(FutureTimeout):
        batcher.submit(b"late", timeout=0.1)  # waits behind "first", gives up
    gate.set()
    first.join(5)
    assert batcher.submit(b"next", timeout=5) == b"next"
    assert seen == [b"first", b"next"]  # "late" was dropped, never run


def test_loop_start_hook_runs_in_each_batching_thread():
    names = []
    MicroBatcher(lambda items: items, loops=2, on_loop_start=lambda: names.append(threading.current_thread().name))
    deadline = time.time() + 5
    while len(names) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(names) == ["micro-batcher-0", "micro-batcher-1"]
