"""Test-only worker plugin: inputs that crash or hang the model run, to test retries and time limits.

Production workers never import this module; a test worker loads it explicitly with
``celery -A worker worker --include tests.service.poison_plugin`` (the worker's working directory is
the repository root). It wraps ``worker.resources.analyse`` (what ``diagnose`` calls for the pipeline):
an input that starts with ``XSO-POISON:<kind>`` misbehaves, any other input goes to the real
pipeline unchanged.

* ``raise``    – the model run raises (a bug, a CUDA error …): retried, then an apology;
* ``segfault`` – the process dies from a signal, as in a native crash: the prefork child is lost,
  the message requeued (``task_reject_on_worker_lost``), MAX_ATTEMPTS bound the rounds;
* ``hang``     – sleeps: the soft time limit interrupts it and the task apologises;
* ``stuck``    – ignores the soft limit like a hang in native code: only the hard time limit ends
  it (the child is killed); the request is requeued and MAX_ATTEMPTS end it with an apology.

``slow(image)`` is no poison: the worker sleeps ``SLOW_S`` and then analyses ``image`` as usual, so a
test can kill a worker that is surely in the middle of a task.
"""

from __future__ import annotations

import os
import signal
import time

from celery.exceptions import SoftTimeLimitExceeded

from worker import resources

MARKER = b"XSO-POISON:"
KINDS = ("raise", "segfault", "hang", "stuck")
SLOW_S = 3.0

_real_analyse = resources.analyse


def poison(kind: str) -> bytes:
    """Bytes that make the patched worker misbehave in the way ``kind`` names."""
    assert kind in KINDS, kind
    return MARKER + kind.encode() + b":" + os.urandom(8).hex().encode()


def slow(image: bytes) -> bytes:
    """``image``, analysed only after ``SLOW_S`` seconds by the patched worker."""
    return MARKER + b"slow:" + image


def _analyse(data: bytes, mode: str = "screening"):
    if data.startswith(MARKER):
        kind = data[len(MARKER):].split(b":", 1)[0].decode()
        resources.process_logger.warning("poison plugin: %s", kind)
        if kind == "slow":
            time.sleep(SLOW_S)
            return _real_analyse(data[len(MARKER) + len(b"slow:"):], mode)
        if kind == "raise":
            raise RuntimeError("poisoned input: the model run crashed")
        if kind == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(10)  # the signal is delivered before this returns
        if kind == "hang":
            time.sleep(3600)
        if kind == "stuck":
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                try:
                    time.sleep(1)
                except SoftTimeLimitExceeded:
                    continue
    return _real_analyse(data, mode)


resources.analyse = _analyse
