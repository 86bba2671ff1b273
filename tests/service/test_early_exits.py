"""End to end for the early exits: a natural photo (not an X-ray) and a hand radiograph (not analysed yet).

Each scenario gets its own worker, loaded with factory models that force that route.
"""

from __future__ import annotations

import time

import pytest
from model_factory import make_models_dir

from diagnosis.messages import PHYSICIAN, gettext_for

from .conftest import TOKEN, start_worker
from .harness import sample_image

pytestmark = pytest.mark.slow

SCENARIOS = {
    # scenario: (factory arguments, image, start of the reply)
    "not_xray": ({"xray": False}, "natural", "This does not look like an X-ray image"),
    "hand": ({"xray": True, "body_part": "hand"}, "hand", "A hand X-ray was recognised"),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, fake_telegram, redis_db, tmp_path_factory):
    factory_args, image, expected = SCENARIOS[request.param]
    models = make_models_dir(tmp_path_factory.mktemp(f"models-{request.param}"), **factory_args)
    worker = start_worker(fake_telegram, redis_db, models, tmp_path_factory.mktemp(f"log-{request.param}"))
    yield worker, sample_image(image), expected
    worker.stop()


def test_early_exit_reply_has_reason_physician_prompt_and_no_overlay(scenario, start_bot, fake, redis_client):
    worker, image, expected = scenario
    user = 801
    with start_bot():
        fake.inject_photo(user, image)
        physician = gettext_for("en")(PHYSICIAN)
        fake.wait_for(lambda: [t for t in fake.texts_to(user) if physician in t], timeout=60)
        fake.wait_for(lambda: fake.calls_of("deleteMessage", user))
        time.sleep(0.5)
    results = [t for t in fake.texts_to(user) if physician in t]
    assert len(results) == 1 and results[0].startswith(expected)
    assert not fake.calls_of("sendPhoto") and not fake.calls_of("sendMediaGroup")
    assert not list(redis_client.scan_iter("xso:blob:*"))
    log = worker.log()
    assert TOKEN not in log  # request URLs (with the token) are not logged
    assert "Traceback" not in log
