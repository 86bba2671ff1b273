"""Fault injection with the real parts: poison inputs, a flaky Telegram, a bot killed with requests queued.

One worker serves the module, run as production runs it (prefork, one child, time limits enforced;
``pool=solo`` ignores them) with short limits, ``MAX_ATTEMPTS=2`` and the test-only
``tests.service.poison_plugin`` (inputs starting with ``XSO-POISON:<kind>`` crash or hang the model
run; everything else goes to the real pipeline with the factory models). Each scenario checks that
every request gets exactly one final answer (findings or an apology) and that the worker keeps
serving. ``XSO_FAULT_REQUESTS`` sets the number of requests of the load-like scenarios.
"""

from __future__ import annotations

import time

import pytest
from model_factory import make_models_dir

from contract.keys import INFERENCE_QUEUE
from diagnosis.messages import analysed_heading, apology

from .conftest import FAULT_REQUESTS, TOKEN, worker_env
from .harness import BotProcess, WorkerProcess, chat_summary, sample_image
from .poison_plugin import KINDS, poison

pytestmark = pytest.mark.slow

CHEST = sample_image("chest")
SHORT = {"DIAGNOSE_SOFT_TIME_LIMIT_S": "3", "DIAGNOSE_TIME_LIMIT_S": "5", "DELIVER_SOFT_TIME_LIMIT_S": "10",
         "DELIVER_TIME_LIMIT_S": "12", "MAX_RETRY_DELAY_S": "3", "MAX_ATTEMPTS": "2"}
ANALYSED = analysed_heading("chest", "en")
APOLOGY = apology("en").split("\n")[0]
CHILD_DEATHS = ("exited with", "Hard time limit", "WorkerLostError")


@pytest.fixture(scope="module")
def worker(fake_telegram, redis_db, tmp_path_factory):
    models = make_models_dir(tmp_path_factory.mktemp("fault-models"))
    env = {**worker_env(fake_telegram.url, redis_db[0], models), **SHORT}
    process = WorkerProcess(env, tmp_path_factory.mktemp("fault-log") / "worker.log", pool="prefork",
                            extra_args=("--include", "tests.service.poison_plugin")).start()
    yield process
    process.stop()


def models_ready(worker: WorkerProcess) -> bool:
    """True once the current prefork child has its models (a dead child's successor reloads them)."""
    log = worker.log()
    return log.rfind("models loaded") > max(log.rfind(marker) for marker in CHILD_DEATHS)


def answered(fake, users, photos: bool = True) -> bool:
    summaries = [chat_summary(fake, user) for user in users]
    return all(s.results and (s.photos or not photos) for s in summaries)


# ----------------------------------------------------------------------------- poison inputs
POISON_LOG = {
    "raise": "analysis failed (attempt 2)",  # retried once (MAX_ATTEMPTS=2), then the apology
    "segfault": "signal 11",  # the child died; the message came back (reject_on_worker_lost)
    "hang": "soft time limit exceeded",
    "stuck": "Hard time limit (5",  # the child was killed; the message was requeued, not acknowledged
}
# Generous upper bounds (seconds) for the apology: attempts × limits + child restarts on a busy machine.
POISON_BOUND = {"raise": 30, "segfault": 45, "hang": 25, "stuck": 60}


@pytest.mark.parametrize("kind", KINDS)
def test_poison_input_gets_an_apology_and_the_next_request_is_served(kind, worker, start_bot, fake):
    user = 1100 + KINDS.index(kind)
    with start_bot(**SHORT):
        fake.wait_for(lambda: models_ready(worker), timeout=120)
        started = time.monotonic()
        fake.inject_document(user, poison(kind), file_name="IM0001.dcm", mime_type="application/dicom")
        fake.wait_for(lambda: chat_summary(fake, user).results, timeout=POISON_BOUND[kind] + 30)
        took = time.monotonic() - started

        fake.wait_for(lambda: models_ready(worker), timeout=120)
        fake.inject_photo(user, CHEST)
        fake.wait_for(lambda: len(chat_summary(fake, user).results) == 2 and chat_summary(fake, user).photos,
                      timeout=90)
        time.sleep(1.0)  # a duplicate would arrive now
    summary = chat_summary(fake, user)
    assert len(summary.results) == 2 and summary.overlay_sends == 1, summary
    assert summary.results[0].startswith(APOLOGY)
    assert summary.results[1].startswith(ANALYSED)
    assert worker.process is not None and worker.process.poll() is None  # the worker stayed up
    log = worker.log()
    assert POISON_LOG[kind] in log, log[-3000:]
    assert took < POISON_BOUND[kind], f"apology after {took:.1f}s"


# ----------------------------------------------------------------------------- a flaky Telegram
def test_telegram_answering_429_or_5xx_to_30_percent_of_sends_loses_and_duplicates_nothing(worker, start_bot, fake):
    users = [1200 + i for i in range(FAULT_REQUESTS)]
    with start_bot(**SHORT):
        fake.wait_for(lambda: models_ready(worker), timeout=120)
        fake.fail_next("sendMessage", 429, retry_after=1)  # at least one of each, whatever the dice say
        fake.fail_next("sendPhoto", 502)  # a single overlay…
        fake.fail_next("sendMediaGroup", 502)  # …or an album, whichever the findings give
        # 429s carry retry_after 1-3 s (waited out inline) or 7 s (the bot gives up on the acknowledgement
        # and analyses anyway; the worker retries the delivery task later).
        fake.chaos(0.3, statuses=(429, 429, 500, 502, 503), retry_after=(1, 2, 3, 7), seed=FAULT_REQUESTS)
        for user in users:
            fake.inject_photo(user, CHEST)
        fake.wait_for(lambda: answered(fake, users), timeout=60 + 15 * len(users))
        time.sleep(2.0)
        fake.chaos(0)
    refused = [c for c in fake.calls if c.status != 200 and c.method in ("sendMessage", "sendPhoto", "sendMediaGroup")]
    assert len(refused) >= 2
    for user in users:
        summary = chat_summary(fake, user)
        assert len(summary.results) == 1 and summary.overlay_sends == 1, (user, summary, fake.summary())
        assert summary.acks <= 1
        assert summary.results[0].startswith(ANALYSED)


# ----------------------------------------------------------------------------- the bot dies
def test_bot_killed_while_requests_are_queued_results_still_arrive_once(worker, fake, redis_db, redis_client,
                                                                       tmp_path):
    users = [1300 + i for i in range(FAULT_REQUESTS)]
    blocker, late = 1390, 1391
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": fake.url, "REDIS_URL": redis_db[0], **SHORT}
    fake.wait_for(lambda: models_ready(worker), timeout=120)
    first = BotProcess(env, tmp_path / "bot-1.log").start(fake)
    try:
        # Keep the worker busy (a hang until the soft time limit) so that the requests queue up.
        hangs = worker.log().count("poison plugin: hang")
        fake.inject_document(blocker, poison("hang"), file_name="IM0002.dcm", mime_type="application/dicom")
        fake.wait_for(lambda: worker.log().count("poison plugin: hang") > hangs, timeout=30)
        for user in users:
            fake.inject_photo(user, CHEST)
        fake.wait_for(lambda: first.log().count(" enqueued (") >= len(users) + 1, timeout=30)
        queued = redis_client.llen(INFERENCE_QUEUE)
        first.kill()  # SIGKILL: no shutdown, no goodbye
    finally:
        first.stop()
    assert queued >= 1, "nothing was queued when the bot died"

    fake.wait_for(lambda: answered(fake, users), timeout=60 + 10 * len(users))  # the workers answer, bot or not
    second = BotProcess(env, tmp_path / "bot-2.log").start(fake)
    try:
        fake.inject_photo(late, CHEST)
        fake.wait_for(lambda: answered(fake, [late]), timeout=60)
        time.sleep(1.5)
    finally:
        second.stop()
    for user in users:
        summary = chat_summary(fake, user)
        # Known gap (docs/bursts.md): the acknowledgement is sent by a task of the bot that accepted the
        # image; a bot killed before that task ran leaves the image unacknowledged (its answer still comes).
        assert len(summary.results) == 1 and summary.overlay_sends == 1 and summary.acks <= 1, (user, summary)
    assert chat_summary(fake, blocker).results[0].startswith(APOLOGY)
    assert second.log().count(" enqueued (") == 1  # the new bot handled only the new request, no old update again
