"""End to end for the early exits: a natural photo (not an X-ray), a hand radiograph (not analysed yet),
an X-ray of a body part the model does not know, a CT slice named as such, and a non-medical photo
(refused politely). None of them was read, so none carries the results prompt (unread medical images
get a shorter physician line).

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
    # scenario: (factory arguments, image, start of the reply, physician footer)
    # No reading was given, so no results prompt (it speaks of "this result"): issue #22.
    "not_xray": ({"xray": False}, "natural", "This does not look like an X-ray image.", False),
    "hand": ({"xray": True, "body_part": "hand"}, "hand",
             "I recognised an X-ray of the hand.\nSo far I can only analyse X-rays of the chest.", False),
    "unknown_part": ({"xray": True, "open_set_threshold": 0.5}, "hand",
                     "This looks like an X-ray of a body part I cannot read yet", False),
    "ct": ({"xray": False, "modality": "ct"}, "natural", "This looks like a CT scan", False),
    "non_medical": ({"xray": False, "modality": "non_medical"}, "natural",
                    "Sorry, this does not look like an X-ray image", False),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, fake_telegram, redis_db, tmp_path_factory):
    factory_args, image, expected, footer = SCENARIOS[request.param]
    models = make_models_dir(tmp_path_factory.mktemp(f"models-{request.param}"), **factory_args)
    worker = start_worker(fake_telegram, redis_db, models, tmp_path_factory.mktemp(f"log-{request.param}"))
    yield worker, sample_image(image), expected, footer
    worker.stop()


def test_early_exit_reply_has_its_reason_no_physician_prompt_and_no_overlay(scenario, start_bot, fake, redis_client):
    worker, image, expected, footer = scenario
    user = 801
    with start_bot():
        fake.inject_photo(user, image)
        physician = gettext_for("en")(PHYSICIAN)
        fake.wait_for(lambda: [t for t in fake.texts_to(user) if t.startswith(expected)], timeout=60)
        fake.wait_for(lambda: fake.calls_of("deleteMessage", user))
        time.sleep(0.5)
    results = [t for t in fake.texts_to(user) if t.startswith(expected)]
    assert len(results) == 1 and (physician in results[0]) is footer
    assert not fake.calls_of("sendPhoto") and not fake.calls_of("sendMediaGroup")
    assert not list(redis_client.scan_iter("xso:blob:*"))
    log = worker.log()
    assert TOKEN not in log  # request URLs (with the token) are not logged
    assert "Traceback" not in log
