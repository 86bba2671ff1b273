import io
import json

import numpy as np
import pytest
from conftest import encode, gradient
from model_factory import CHEST_LABELS, make_model, make_models_dir
from PIL import Image

from diagnosis.cards import CardError
from diagnosis.messages import render_reply
from diagnosis.pipeline import Pipeline

IMAGE = encode(Image.fromarray(gradient(300, 260, texture=True)), "JPEG")


@pytest.fixture(scope="module")
def chest_pipeline(fake_models):
    return Pipeline.load(fake_models)


def test_chest_route_gives_findings_heatmap_and_timings(chest_pipeline):
    analysis = chest_pipeline.run(IMAGE, file="a.jpg")
    result = analysis.result
    assert result.outcome == "analysed" and result.is_xray and result.body_part == "chest"
    assert [f.label for f in result.findings] != [] and len(result.findings) == len(CHEST_LABELS)
    probabilities = [f.probability for f in result.findings]
    assert probabilities == sorted(probabilities, reverse=True)
    assert {f.label for f in result.positive_findings} == {"Effusion", "Cardiomegaly"}
    assert result.heatmap_labels == [f.label for f in result.positive_findings]
    # One overlay per drawn finding, in the same order, each the film alone (not panels side by side).
    assert [label for label, _ in analysis.overlays] == result.heatmap_labels
    assert analysis.overlays and analysis.overlays[0][1]
    for _, jpeg in analysis.overlays:
        overlay = Image.open(io.BytesIO(jpeg))
        assert overlay.mode == "RGB" and overlay.format == "JPEG"
        assert max(overlay.size) == 768 and overlay.width < 1.3 * 768 * 300 / 260  # enlarged, one film wide
    for stage in ("decode", "preprocess", "gate", "body_part", "chest", "heatmap", "overlay", "total"):
        assert result.timings_ms[stage] >= 0
    assert result.message == ""  # the pipeline returns data; the reply is rendered at the edge
    reply = render_reply(result)
    assert "physician" in reply and reply.startswith("Chest X-ray analysed")  # the body part from the card
    json.dumps(result.model_dump(mode="json"))  # JSON-serialisable


def test_no_positive_finding_draws_the_top_one(tmp_path):
    pipeline = Pipeline.load(make_models_dir(tmp_path, positives=()))
    result = pipeline.run(IMAGE).result
    assert not result.positive_findings
    assert result.heatmap_labels == [result.findings[0].label]
    assert "does not rule out" in render_reply(result)


def test_not_xray_exits_early_without_overlay(tmp_path):
    analysis = Pipeline.load(make_models_dir(tmp_path, xray=False)).run(IMAGE)
    assert analysis.result.outcome == "not_xray" and not analysis.result.is_xray
    assert not analysis.overlays and analysis.result.findings == []
    assert "body_part" not in analysis.result.timings_ms  # later models skipped


def test_body_part_without_model_says_so(tmp_path):
    analysis = Pipeline.load(make_models_dir(tmp_path, body_part="hand")).run(IMAGE)
    assert analysis.result.outcome == "body_part_not_analysed"
    assert analysis.result.body_part == "hand"
    assert analysis.result.analysable_parts == ["chest"]  # from the abnormality cards present
    assert render_reply(analysis.result).splitlines() == ["I recognised an X-ray of the hand.",
                                                           "So far I can only analyse X-rays of the chest.", "",
                                                           "⚕️ I have not analysed this image. Please show it "
                                                           "to a physician."]
    assert not analysis.overlays


def test_uncertain_body_part_asks_for_clearer_image(tmp_path):
    analysis = Pipeline.load(make_models_dir(tmp_path, body_part_confidence=0.0)).run(IMAGE)
    assert analysis.result.outcome == "body_part_uncertain"
    assert "clearer image" in render_reply(analysis.result)


def test_new_body_part_model_plugs_in_by_adding_a_folder(tmp_path):
    models = make_models_dir(tmp_path, body_part="hand")
    make_model(models / "hand_mura", role="abnormality", body_part="hand", labels=["abnormal"],
               activation="sigmoid", biases=[2.0], thresholds={"abnormal": 0.5}, size=64)
    result = Pipeline.load(models).run(IMAGE).result
    assert result.outcome == "analysed" and result.body_part == "hand"
    assert [f.label for f in result.findings] == ["abnormal"]
    assert render_reply(result).startswith("Hand X-ray analysed")  # no code change names the new body part
    assert render_reply(result, "ru").startswith("Рентгеновский снимок кисти проанализирован")


def test_abnormality_model_can_be_chosen_per_body_part(tmp_path):
    models = make_models_dir(tmp_path)
    make_model(models / "chest_alt", role="abnormality", body_part="chest", labels=["Effusion"],
               activation="sigmoid", biases=[-3.0], size=64)
    result = Pipeline.load(models, abnormality_models={"chest": "chest_alt"}).run(IMAGE).result
    assert [f.label for f in result.findings] == ["Effusion"]


def test_bad_input_becomes_a_rejected_result(chest_pipeline):
    result = chest_pipeline.run(b"\x00\x01garbage").result
    assert result.outcome == "rejected" and result.rejection == "unsupported"
    assert "physician" not in render_reply(result)  # nothing was read: no prompt about "this result"


def test_gradcam_setting_uses_pytorch_grad_cam(fake_models):
    pipeline = Pipeline.load(fake_models, heatmap="gradcam")
    analysis = pipeline.run(IMAGE)
    assert analysis.overlays and analysis.result.heatmap_labels


def test_large_image_overlay_is_capped(chest_pipeline):
    big = encode(Image.fromarray(np.tile(gradient(400, 300, texture=True), (8, 8))), "JPEG")  # 3200×2400
    analysis = chest_pipeline.run(big)
    assert analysis.overlays
    for _, jpeg in analysis.overlays:
        overlay = Image.open(io.BytesIO(jpeg))
        assert overlay.width == 1280 and overlay.height <= 1280  # 1280×960 film + the legend strip


def test_poor_photo_of_an_xray_is_refused_with_advice(chest_pipeline):
    film = (gradient(300, 260, texture=True) * 0.1).astype(np.uint8)
    photo = encode(Image.fromarray(np.dstack([film, film, film + 3])), "PNG")  # colour: a camera's photo
    analysis = chest_pipeline.run(photo)
    assert analysis.result.outcome == "retake" and analysis.result.retake == ["too_dark"]
    assert "body_part" not in analysis.result.timings_ms and not analysis.overlays
    assert "too dark" in render_reply(analysis.result) and "physician" not in render_reply(analysis.result)


def test_a_dark_file_is_read_after_windowing_and_its_overlay_is_not_dark(chest_pipeline):
    """The same dark pixels sent as a gray file: windowed to their range (a viewer's window/level),
    read, and the overlay is drawn on the windowed film."""
    film = (gradient(300, 260, texture=True) * 0.1).astype(np.uint8)
    analysis = chest_pipeline.run(encode(Image.fromarray(film), "PNG"))
    assert analysis.result.outcome == "analysed" and not analysis.result.retake
    assert analysis.overlays
    overlay = np.asarray(Image.open(io.BytesIO(analysis.overlays[0][1])).convert("L"))
    assert np.percentile(overlay, 90) > 3 * np.percentile(film, 90)


def test_photo_of_a_film_is_straightened_and_the_reply_says_so(chest_pipeline, pack):
    from training.data.synthetic_photos import synthesise, to_gray

    film = np.asarray(Image.open(pack / "images/nih_cxr14/00001382_000.jpg").convert("L"))
    photo = to_gray(synthesise(film, np.random.default_rng(3)))
    analysis = chest_pipeline.run(encode(Image.fromarray(photo), "JPEG"))
    assert analysis.result.rectified
    assert "straightened" in render_reply(analysis.result)


def test_poor_photo_that_is_not_an_xray_hears_not_an_xray(tmp_path):
    dark = encode(Image.fromarray((gradient(300, 260, texture=True) * 0.1).astype(np.uint8)), "PNG")
    result = Pipeline.load(make_models_dir(tmp_path, xray=False)).run(dark).result
    assert result.outcome == "not_xray" and result.retake == []


@pytest.mark.parametrize(("threshold", "outcome"), [(0.5, "body_part_unknown"), (2.0, "analysed")])
def test_open_set_check_says_unknown_part_only_above_its_threshold(tmp_path, threshold, outcome):
    # The factory's open-set arrays put every image at distance exactly 1 from the known parts.
    result = Pipeline.load(make_models_dir(tmp_path, open_set_threshold=threshold)).run(IMAGE).result
    assert result.outcome == outcome and result.body_part_novelty == pytest.approx(1.0, abs=1e-3)
    if outcome == "body_part_unknown":
        assert result.body_part is None and result.findings == []
        reply = render_reply(result)
        assert reply.startswith("This looks like an X-ray of a body part I cannot read yet")
        assert "So far I can only analyse X-rays of the chest." in reply.splitlines()
        assert reply.splitlines()[-1] == "⚕️ I have not analysed this image. Please show it to a physician."


@pytest.mark.parametrize(("film", "photo"), [(0.5, 2.0), (2.0, 0.5)])
def test_open_set_judges_straightened_photos_by_the_photo_threshold(tmp_path, pack, film, photo):
    from training.data.synthetic_photos import synthesise, to_gray

    # Every image lies at distance 1: below a threshold of 2 it is a known part, above 0.5 unknown.
    pipeline = Pipeline.load(make_models_dir(tmp_path, open_set_threshold=film, open_set_photo_threshold=photo))
    expected = {0.5: "body_part_unknown", 2.0: "analysed"}
    digital = pipeline.run(IMAGE).result
    assert not digital.rectified and digital.outcome == expected[film]
    shot = to_gray(synthesise(np.asarray(Image.open(pack / "images/nih_cxr14/00001382_000.jpg").convert("L")),
                              np.random.default_rng(3)))
    straightened = pipeline.run(encode(Image.fromarray(shot), "JPEG")).result
    assert straightened.rectified and straightened.outcome == expected[photo]


@pytest.mark.parametrize(("film", "photo"), [(0.5, 2.0), (2.0, 0.5)])
def test_open_set_judges_a_photo_with_no_film_found_by_the_photo_threshold(tmp_path, film, photo):
    """A colour phone photo the photo step does not straighten (its sender cropped it to the film) is
    still a photo; a large gray file is a film, whatever its size (issue #21)."""
    pipeline = Pipeline.load(make_models_dir(tmp_path, open_set_threshold=film, open_set_photo_threshold=photo))
    expected = {0.5: "body_part_unknown", 2.0: "analysed"}
    gray = gradient(640, 480, texture=True)
    cast = np.clip(np.dstack([gray] * 3).astype(np.int16) + np.array([8, 0, -8]), 0, 255).astype(np.uint8)
    colour = pipeline.run(encode(Image.fromarray(cast), "JPEG")).result
    assert colour.photographed and not colour.rectified and colour.outcome == expected[photo]
    large = pipeline.run(encode(Image.fromarray(gray), "JPEG")).result
    assert not large.photographed and not large.rectified and large.outcome == expected[film]


def test_cards_without_photo_settings_use_the_film_ones_for_photos(tmp_path):
    from diagnosis.cards import read_card

    spec = read_card(make_models_dir(tmp_path, open_set_threshold=0.5, chest_floor=0.9) / "body_part").open_set
    assert spec.photo_threshold is None and spec.threshold_for(True) == spec.threshold_for(False) == 0.5
    assert spec.floors_for(True) == spec.floors_for(False) == {"chest": 0.9}
    spec.photo_threshold, spec.photo_label_min_confidence = 3.0, {"chest": 0.7}
    assert spec.threshold_for(True) == 3.0 and spec.threshold_for(False) == 0.5
    assert spec.floors_for(True) == {"chest": 0.7} and spec.floors_for(False) == {"chest": 0.9}


def test_chest_reaches_the_chest_model_only_above_its_stricter_floor(tmp_path):
    # body_part_confidence 3: chest top-1 ≈ 0.91, above min_confidence 0.5 but below a 0.95 chest floor.
    strict = Pipeline.load(make_models_dir(tmp_path / "strict", body_part_confidence=3.0, chest_floor=0.95))
    assert strict.run(IMAGE).result.outcome == "body_part_uncertain"
    lenient = Pipeline.load(make_models_dir(tmp_path / "lenient", body_part_confidence=3.0, chest_floor=0.8))
    assert lenient.run(IMAGE).result.outcome == "analysed"


def test_open_set_arrays_are_checked_by_hash(tmp_path):
    models = make_models_dir(tmp_path, open_set_threshold=2.0)
    (models / "body_part" / "open_set.safetensors").write_bytes(b"tampered")
    with pytest.raises(CardError, match="sha256"):
        Pipeline.load(models)


@pytest.mark.parametrize(("modality", "start", "footer"), [  # a medical image, unread, still goes to a physician
    ("ct", "This looks like a CT scan", True), ("ultrasound", "This looks like an ultrasound image", True),
    ("non_medical", "Sorry, this does not look like an X-ray image", False)])
def test_modality_head_names_what_the_gate_refused(tmp_path, modality, start, footer):
    result = Pipeline.load(make_models_dir(tmp_path, xray=False, modality=modality)).run(IMAGE).result
    assert result.outcome == "not_xray" and result.modality == modality
    reply = render_reply(result)
    assert reply.startswith(start) and ("physician" in reply) is footer


def test_modality_head_says_xray_when_the_gate_accepts(tmp_path):
    # Its bias prefers CT, but the gate decides X-ray or not; the head only names refused images.
    result = Pipeline.load(make_models_dir(tmp_path, xray=True, modality="ct")).run(IMAGE).result
    assert result.outcome == "analysed" and result.modality == "xray"


TALL = gradient(180, 300, texture=True)  # portrait: a turn by 90° shows in the shape of what the models see


@pytest.mark.parametrize(("said", "floor", "turned"), [
    ("90", 0.5, 90), ("270", 0.5, 270), ("180", 0.5, 180), ("0", 0.5, 0), ("not_xray", 0.5, 0), ("90", 0.95, 0)])
def test_orientation_head_turns_the_picture_upright_only_when_sure(tmp_path, said, floor, turned):
    models = make_models_dir(tmp_path, orientation=said, orientation_min_probability=floor)
    analysis = Pipeline.load(models).run(encode(Image.fromarray(TALL), "PNG"))
    result = analysis.result
    assert result.outcome == "analysed" and result.turned == turned
    overlay = Image.open(io.BytesIO(analysis.overlays[0][1]))
    assert (overlay.width > overlay.height) is (turned in (90, 270))  # drawn over the upright film
    assert ("I turned your picture upright" in render_reply(result)) is bool(turned)
    assert ("gate_upright" in result.timings_ms) is bool(turned)


def test_orientation_head_works_in_a_batch_with_the_gate_seeing_the_turned_films(tmp_path):
    pipeline = Pipeline.load(make_models_dir(tmp_path, orientation="270"))
    results = [a.result for a in pipeline.run_batch([IMAGE, encode(Image.fromarray(TALL), "PNG"), b"junk"])]
    assert [r.turned for r in results] == [270, 270, 0]
    assert [r.outcome for r in results] == ["analysed", "analysed", "rejected"]


@pytest.mark.parametrize(("xray", "turned"), [(False, 90), (True, 0)])
def test_a_picture_the_gate_refuses_as_sent_is_turned_at_the_lower_floor(tmp_path, xray, turned):
    """Head at ~0.9 for "90"; floors 0.95 (accepted as sent) and 0.5 (refused as sent)."""
    models = make_models_dir(tmp_path, xray=xray, orientation="90", orientation_min_probability=0.95,
                             orientation_min_probability_refused=0.5)
    result = Pipeline.load(models).run(encode(Image.fromarray(TALL), "PNG")).result
    assert result.turned == turned
    # The stand-in gate refuses whatever it sees: the turned picture stays "not an X-ray", and the
    # reply does not talk about turning a picture it did not read.
    assert result.outcome == ("analysed" if xray else "not_xray")
    assert "I turned your picture" not in render_reply(result)


@pytest.mark.parametrize(("upright_floor", "turned"), [(0.5, 0), (0.02, 90)])
def test_a_turn_on_trial_stands_only_when_the_head_calls_the_turned_back_picture_upright(tmp_path, upright_floor,
                                                                                      turned):
    """Head at ~0.9 for "90" on every picture, below the sure floor (0.95) but above the trial floor: the
    turned-back picture is shown to the head again, which still says "90" ("0" at ~0.025), so the turn
    stands only when ~0.025 is enough. Either way the gate looked twice and the overlay fits the
    picture read."""
    models = make_models_dir(tmp_path, orientation="90", orientation_min_probability=0.95,
                             orientation_spec={"confirm_min_probability": 0.5,
                                               "confirm_upright_probability": upright_floor})
    analysis = Pipeline.load(models).run(encode(Image.fromarray(TALL), "PNG"))
    result = analysis.result
    assert result.outcome == "analysed" and result.turned == turned and "gate_upright" in result.timings_ms
    overlay = Image.open(io.BytesIO(analysis.overlays[0][1]))
    assert (overlay.width > overlay.height) is bool(turned)
    assert ("I turned your picture upright" in render_reply(result)) is bool(turned)


def upright_head(models, picture: np.ndarray, others: list[np.ndarray], bias: tuple = (0, 0, 0, 0)) -> None:
    """Replace the gate's orientation arrays by a head that knows one picture: "0" rises with the
    cosine between a picture's gate map and ``picture``'s, to ~0.8 for ``picture`` itself and ~0.01 at
    the closest of ``others``; the other classes ("90", "180", "270", "not_xray") have logit ``bias``."""
    from model_factory import _arrays

    from diagnosis.cards import read_card, write_card
    from diagnosis.openset import flatten_maps

    gate = Pipeline.load(models).gate
    flat = flatten_maps(gate.runner(np.stack([gate.prepare(p) for p in [picture, *others]]))[1])
    closest = float((flat[1:] @ flat[0]).max())
    middle, logit = (1 + closest) / 2, np.log(16.0)  # at cosine 1: e^logit / (e^logit + 4) = 0.8
    weight = np.zeros((5, flat.shape[1]))
    weight[0] = logit / (1 - middle) * flat[0]
    card = read_card(models / "gate")
    card.orientation.arrays = _arrays(models / "gate", "orientation.safetensors", {
        "weight": weight, "bias": np.array([-logit * middle / (1 - middle), *bias])})
    write_card(models / "gate", card)


@pytest.mark.parametrize(("below", "floor", "sent", "turned"), [
    (0.5, 0.7, 1, 90), (0.5, 0.7, 3, 270), (0.5, 0.7, 2, 180),
    (0.5, 0.9, 1, 0),  # the copy the head calls upright most (~0.8) is below the floor: read as sent
    (None, 0.7, 1, 0),  # no search on the card
    (0.5, 0.7, 0, 0)])  # the picture as sent reads upright (~0.8): nothing searched, nothing paid
def test_a_picture_the_head_is_unsure_of_is_searched_for_its_upright_turn(tmp_path, below, floor, sent, turned):
    """The head knows the upright TALL film only; the picture is TALL turned counter-clockwise by
    ``sent`` quarter turns, on which the head says no turn (every turn class ~0.25 < the trial floor)."""
    models = make_models_dir(tmp_path, orientation="0", orientation_min_probability=0.95,
                             orientation_spec={"confirm_min_probability": 0.45, "search_upright_below": below,
                                               "search_upright_probability": floor})
    upright_head(models, TALL, [np.rot90(TALL, k) for k in (1, 2, 3)])
    analysis = Pipeline.load(models).run(encode(Image.fromarray(np.rot90(TALL, sent)), "PNG"))
    result = analysis.result
    assert result.outcome == "analysed" and result.turned == turned
    assert ("gate_search" in result.timings_ms) is (below is not None and sent != 0)
    overlay = Image.open(io.BytesIO(analysis.overlays[0][1]))  # drawn over the picture read
    assert (overlay.width > overlay.height) is (sent % 2 == 1 and not turned % 180)
    assert ("I turned your picture upright" in render_reply(result)) is bool(turned)


def test_a_turn_on_trial_that_fails_is_followed_by_the_search(tmp_path):
    """The head leans to "180" (~0.5 on the sideways picture: a turn on trial), but the picture turned
    back by 180° does not read upright; the search then finds the quarter turn (~0.73 upright)."""
    models = make_models_dir(tmp_path, orientation="0", orientation_min_probability=0.95,
                             orientation_spec={"confirm_min_probability": 0.45, "confirm_upright_probability": 0.7,
                                               "search_upright_below": 0.5, "search_upright_probability": 0.6})
    upright_head(models, TALL, [np.rot90(TALL, k) for k in (1, 2, 3)], bias=(0, np.log(3.0), 0, 0))
    result = Pipeline.load(models).run(encode(Image.fromarray(np.rot90(TALL, 1)), "PNG")).result
    assert result.turned == 90 and {"gate_upright", "gate_search"} <= set(result.timings_ms)


@pytest.mark.parametrize(("not_xray_floor", "outcome", "turned"), [(0.5, "not_xray", 0), (0.8, "analysed", 90)])
def test_a_picture_the_head_refuses_as_not_an_xray_as_sent_is_not_searched(tmp_path, not_xray_floor, outcome,
                                                                          turned):
    """The head leans to "not_xray" (~0.75 on the sideways picture); its upright copy would read
    upright (~0.57) with "not_xray" ~0.32. Refused as sent (floor 0.5): no search, not an X-ray (a
    turned copy of an ultrasound image can read upright). Not refused (floor 0.8): searched, read."""
    models = make_models_dir(tmp_path, orientation="0", orientation_min_probability=0.95,
                             orientation_spec={"search_upright_below": 0.5, "search_upright_probability": 0.5,
                                               "not_xray_min_probability": not_xray_floor})
    upright_head(models, TALL, [np.rot90(TALL, k) for k in (1, 2, 3)], bias=(0, 0, 0, np.log(9.0)))
    result = Pipeline.load(models).run(encode(Image.fromarray(np.rot90(TALL, 1)), "PNG")).result
    assert result.outcome == outcome and result.turned == turned
    assert ("gate_search" in result.timings_ms) is bool(turned)


def test_the_search_runs_in_a_batch_for_the_unsure_pictures_only(tmp_path):
    models = make_models_dir(tmp_path, orientation="0", orientation_min_probability=0.95,
                             orientation_spec={"search_upright_below": 0.5, "search_upright_probability": 0.7})
    upright_head(models, TALL, [np.rot90(TALL, k) for k in (1, 2, 3)])
    pictures = [encode(Image.fromarray(np.rot90(TALL, k)), "PNG") for k in (0, 3, 1)]
    results = [a.result for a in Pipeline.load(models).run_batch(pictures)]
    assert [r.turned for r in results] == [0, 270, 90]
    assert ["gate_search" in r.timings_ms for r in results] == [False, True, True]


@pytest.mark.parametrize(("floor", "outcome"), [(0.8, "not_xray"), (0.95, "analysed"), (None, "analysed")])
def test_the_orientation_heads_not_xray_refuses_what_the_gate_accepts(tmp_path, floor, outcome):
    """The gate accepts everything; the head says "not_xray" at ~0.9 for every picture."""
    models = make_models_dir(tmp_path, orientation="not_xray", orientation_spec={"not_xray_min_probability": floor})
    result = Pipeline.load(models).run(IMAGE).result
    assert result.outcome == outcome and result.is_xray is (outcome == "analysed") and result.turned == 0
    # Refused: the lower of the gate's (~1) and the head's (1 - ~0.9) is reported, as the decision reads.
    assert result.xray_probability == (pytest.approx(0.1, abs=0.01) if outcome == "not_xray" else pytest.approx(1.0))


@pytest.mark.parametrize(("confidence", "allowance", "outcome"), [
    (8.0, (0.99, 2.0), "analysed"),  # sure of the part, within the allowance: named
    (8.0, (0.99, 0.9), "body_part_unknown"),  # beyond the allowance
    (1.0, (0.99, 2.0), "body_part_unknown"),  # not sure enough of the part for the allowance
    (8.0, None, "body_part_unknown")])  # no allowance: the threshold alone
def test_a_confident_film_may_lie_further_out_before_it_is_an_unknown_part(tmp_path, confidence, allowance, outcome):
    from model_factory import add_open_set

    models = make_models_dir(tmp_path, body_part_confidence=confidence)
    add_open_set(models / "body_part", threshold=0.5, confident=allowance)  # every film lies at distance 1
    assert Pipeline.load(models).run(IMAGE).result.outcome == outcome


def vote(turned_by: int, upright: float = 0.6, not_xray: float = 0.1) -> np.ndarray:
    """Head probabilities of the four views (as sent, turned back by 90, 180, 270°) of a film turned by
    ``turned_by`` quarter turns, each view calling its own turn with ``upright`` and "not_xray" with
    ``not_xray``; the rest spread evenly."""
    rows = np.full((4, 5), (1 - upright - not_xray) / 3)
    for k in range(4):
        rows[k, (turned_by - k) % 4], rows[k, 4] = upright, not_xray
    return rows


def test_the_four_views_vote_for_the_turn_and_one_upright_looking_copy_is_outvoted():
    from diagnosis.openset import consensus_turn

    classes = ["0", "90", "180", "270", "not_xray"]
    ultrasound = np.full((4, 5), 0.05)
    ultrasound[:, 4] = 0.8
    ultrasound[1] = [0.9, 0.02, 0.02, 0.02, 0.04]  # its copy turned back by 90° reads upright
    ultrasound /= ultrasound.sum(axis=1, keepdims=True)
    weak = vote(1, upright=0.3, not_xray=0.1)  # a posterior of ~0.6 for "turned by 90"
    pictures = np.stack([vote(1), vote(3), vote(2), vote(0), ultrasound, weak])
    assert consensus_turn(pictures, classes, 0.5) == [1, 3, 2, 0, 0, 1]
    assert consensus_turn(pictures, classes, 0.7) == [1, 3, 2, 0, 0, 0]  # the weak vote is below the floor
    # A film the head calls "not_xray" as sent (0.6) is still turned when the other three views agree.
    refused_as_sent = vote(1, upright=0.8, not_xray=0.05)
    refused_as_sent[0] = [0.1, 0.2, 0.05, 0.05, 0.6]
    assert consensus_turn(refused_as_sent[None], classes, 0.5) == [1]


def turn_head(models, picture: np.ndarray, not_xray_odds: float) -> None:
    """Replace the gate's orientation arrays by a head that knows ``picture`` at every quarter turn: the
    class of a turn rises with the cosine between a picture's gate map and ``picture`` turned so (to
    ~0.8 for the upright picture, ~0.5 for a turned one), and "not_xray" has odds ``not_xray_odds``."""
    from model_factory import _arrays

    from diagnosis.cards import read_card, write_card
    from diagnosis.openset import flatten_maps

    gate = Pipeline.load(models).gate
    flat = flatten_maps(gate.runner(np.stack([gate.prepare(np.rot90(picture, k)) for k in range(4)]))[1])
    closest = float((flat @ flat.T)[~np.eye(4, dtype=bool)].max())
    middle = (1 + closest) / 2
    strength = np.log([16.0, 4.0, 4.0, 4.0])
    weight = np.zeros((5, flat.shape[1]))
    weight[:4] = (strength / (1 - middle))[:, None] * flat
    card = read_card(models / "gate")
    card.orientation.arrays = _arrays(models / "gate", "orientation.safetensors", {
        "weight": weight, "bias": np.array([*(-strength * middle / (1 - middle)), np.log(not_xray_odds)])})
    write_card(models / "gate", card)


@pytest.mark.parametrize(("consensus", "outcome", "turned"), [(None, "not_xray", 0), (0.5, "analysed", 90)])
def test_a_picture_the_head_refuses_as_sent_is_searched_when_the_views_vote(tmp_path, consensus, outcome, turned):
    """Sent turned by 90°, the picture reads "90" and "not_xray" alike (~0.48 each): refused as sent
    (floor 0.4) and not sure enough to turn. Without the vote it is not searched: not an X-ray. With
    it, the four views agree on "turned by 90" (the upright copy "0" ~0.78, "not_xray" ~0.2): turned
    upright, accepted and read."""
    models = make_models_dir(tmp_path, orientation="0", orientation_min_probability=0.95,
                             orientation_spec={"search_upright_below": 0.9, "search_upright_probability": 0.5,
                                               "not_xray_min_probability": 0.4,
                                               "search_consensus_probability": consensus})
    turn_head(models, TALL, not_xray_odds=4.0)
    pipeline = Pipeline.load(models)
    sent = np.rot90(TALL, 1)
    assert pipeline.gate.orientation.not_xray(pipeline.gate.runner(pipeline.gate.prepare(sent)[None])[1])[0][0]
    analysis = pipeline.run(encode(Image.fromarray(sent), "PNG"))
    result = analysis.result
    assert result.outcome == outcome and result.turned == turned
    assert ("gate_search" in result.timings_ms) is (consensus is not None)
    assert ("I turned your picture upright" in render_reply(result)) is bool(turned)
    if turned:  # findings and overlay on the upright film
        overlay = Image.open(io.BytesIO(analysis.overlays[0][1]))
        assert overlay.height > overlay.width
