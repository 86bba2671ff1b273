"""Issue #22 part 1: overlays relative to normal films, peaks in the input's pixels, --draw.

Stand-in models (random weights): nothing here asserts that an untrained model's map points
anywhere; the rules are checked on maps whose values are known by construction."""

import json

import cv2
import numpy as np
import pytest
from conftest import encode, gradient
from model_factory import CHEST_LABELS, add_heatmap_baseline, make_models_dir
from PIL import Image
from test_cli import run_cli

from diagnosis.cards import CardError, read_card
from diagnosis.heatmap import hottest_red_point, relative_evidence, signed_map, without_red
from diagnosis.messages import OVERLAY_TITLE_NOT_FLAGGED, overlay_caption
from diagnosis.overlay import _blend, _upsample, fit_film
from diagnosis.pipeline import Pipeline, to_input_pixels

IMAGE = encode(Image.fromarray(gradient(300, 260, texture=True)), "JPEG")
rng = np.random.default_rng(0)


def test_a_film_like_the_normal_mean_is_neutral_and_the_excess_is_scaled_by_a_fixed_scale():
    weights, features = rng.normal(size=8).astype(np.float32), rng.random((8, 4, 4)).astype(np.float32)
    normal = signed_map(weights, features)
    assert np.abs(relative_evidence(weights, features, normal, 2.0)).max() < 1e-6  # nothing to show
    shifted = normal.copy()
    shifted[1, 2] -= 1.0  # this cell of the film raised the estimate by 1 more than the normal mean
    heat = relative_evidence(weights, features, shifted, 2.0)
    assert heat[1, 2] == pytest.approx(0.5) and np.count_nonzero(np.abs(heat) > 1e-6) == 1
    assert relative_evidence(weights, features, normal - 10.0, 2.0).max() == 1.0  # clipped to [-1, 1]


def test_the_map_adds_up_to_the_logit_minus_the_normal_mean_logit():
    """Unclipped, the map's mean × scale is exactly this film's logit minus the normal mean's logit."""
    weights, features = rng.normal(size=16).astype(np.float32), rng.random((16, 4, 4)).astype(np.float32)
    normal_maps = [signed_map(weights, rng.random((16, 4, 4)).astype(np.float32)) for _ in range(5)]
    mean = np.mean(normal_maps, axis=0)
    heat = relative_evidence(weights, features, mean, 1e3)  # a large scale: nothing clipped
    logit, normal_logit = signed_map(weights, features).mean(), np.mean([m.mean() for m in normal_maps])
    assert heat.mean() * 1e3 == pytest.approx(logit - normal_logit, rel=1e-4)


def test_a_map_drawn_without_red_shows_no_red_pixel():
    heat = np.array([[1.0, -0.8], [0.4, 0.0]], np.float32)
    film = fit_film(np.full((128, 128), 120, np.uint8))
    shown = _blend(film, _upsample(without_red(heat), *film.shape[1::-1])).astype(int)
    assert without_red(heat).max() <= 0
    assert not np.any(shown[..., 2] > shown[..., 0] + 8)  # no pixel redder than the film
    assert np.any(shown[..., 0] > shown[..., 2] + 8)  # the blue is kept


def test_hottest_red_point_is_the_hot_cell_and_none_without_red():
    heat = np.full((8, 8), -0.2, np.float32)
    heat[2, 5] = 1.0  # row 2, column 5 of 8 → x ≈ 5.5/8·128 = 88, y ≈ 2.5/8·128 = 40
    x, y = hottest_red_point(heat, 128, 128)
    assert abs(x - 88) <= 2 and abs(y - 40) <= 2
    assert hottest_red_point(np.full((4, 4), -0.5, np.float32), 128, 128) is None


@pytest.mark.parametrize("turned", [0, 90, 180, 270])
def test_a_point_on_the_upright_film_maps_back_to_the_pixel_as_sent(turned):
    sent = np.zeros((60, 100), np.uint8)
    sent[13, 71] = 255  # the spot, at column 71, row 13 of the picture as sent
    upright = np.rot90(sent, -turned // 90)  # what the pipeline does to a picture that arrived turned
    row, column = np.argwhere(upright == 255)[0]
    point = (column + 0.5, row + 0.5)
    assert to_input_pixels(point, upright.shape, turned, None, sent.shape) == [71, 13]


@pytest.mark.parametrize("turned", [0, 90])
def test_a_point_on_the_straightened_film_maps_back_into_the_photo(turned):
    corners = np.float32([[30, 20], [170, 26], [165, 230], [25, 222]])  # TL, TR, BR, BL in the photo
    columns, rows = 141, 205
    target = np.float32([[0, 0], [columns - 1, 0], [columns - 1, rows - 1], [0, rows - 1]])
    warp = cv2.getPerspectiveTransform(corners, target)
    spot = np.float32([[[100, 150]]])  # a pixel of the photo, on the film
    on_film = cv2.perspectiveTransform(spot, warp)[0, 0]  # where photo._straighten puts it
    straight = np.zeros((rows, columns), np.uint8)
    straight[round(float(on_film[1])), round(float(on_film[0]))] = 255
    upright = np.rot90(straight, -turned // 90)
    row, column = np.argwhere(upright == 255)[0]
    x, y = to_input_pixels((column + 0.5, row + 0.5), upright.shape, turned, corners, (260, 200))
    assert abs(x - 100) <= 1 and abs(y - 150) <= 1


def test_nothing_flagged_draws_the_top_finding_without_red_and_no_peak(tmp_path):
    pipeline = Pipeline.load(make_models_dir(tmp_path, positives=()))
    analysis = pipeline.run(IMAGE)
    result = analysis.result
    assert not result.positive_findings and len(result.heatmap_labels) == 1
    assert result.peaks == [None]  # no red: no hottest red point
    shown = cv2.imdecode(np.frombuffer(analysis.overlays[0][1], np.uint8), cv2.IMREAD_COLOR).astype(int)
    film = shown[: shown.shape[0] * 9 // 10]  # above the legend
    assert not np.any(film[..., 2] > film[..., 0] + 16)


def test_a_strongly_raised_finding_shows_red_with_its_peak_in_the_input(tmp_path):
    """A normal mean far below the film's own map makes every cell red: the peak is on the film."""
    models = make_models_dir(tmp_path, positives=("Effusion",))
    add_heatmap_baseline(models / "chest", mean=-1e3, scale=1.0)
    result = Pipeline.load(models).run(IMAGE).result
    assert result.heatmap_labels == ["Effusion"]
    [peak] = result.peaks
    assert peak is not None and 0 <= peak[0] < 300 and 0 <= peak[1] < 260


def test_draw_draws_the_named_finding_with_red_whatever_was_flagged(tmp_path):
    models = make_models_dir(tmp_path, positives=())
    add_heatmap_baseline(models / "chest", mean=-1e3, scale=1.0)
    pipeline = Pipeline.load(models)
    result = pipeline.run(IMAGE, draw=["Pneumothorax", "Mass"]).result
    assert not result.positive_findings
    assert result.heatmap_labels == ["Pneumothorax", "Mass"] and all(p is not None for p in result.peaks)
    with pytest.raises(ValueError, match="Lung"):
        pipeline.run(IMAGE, draw=["Lung"])


def test_heatmap_arrays_are_checked_by_hash(tmp_path):
    models = make_models_dir(tmp_path)
    card = read_card(models / "chest")
    (models / "chest" / card.heatmap.arrays.file).write_bytes(b"changed")
    with pytest.raises(CardError, match="sha256"):
        Pipeline.load(models)


def test_caption_of_an_unflagged_map_says_it_is_not_flagged_and_has_no_red():
    flagged = overlay_caption("Effusion", 0.62, "en")
    assert "Red:" in flagged and "typical films without findings" in flagged
    quiet = overlay_caption("Effusion", 0.12, "en", flagged=False)
    assert quiet.startswith(OVERLAY_TITLE_NOT_FLAGGED.split("{")[0]) and "no area is marked red" in quiet
    assert "Red:" not in quiet
    for language in ("ru", "kk", "fr"):
        assert overlay_caption("Effusion", 0.12, language, flagged=False) != quiet  # translated


def test_cli_draw_and_json_peaks(tmp_path):
    models = make_models_dir(tmp_path / "models", positives=())
    image = tmp_path / "film.png"
    image.write_bytes(encode(Image.fromarray(gradient(texture=True)), "PNG"))
    proc = run_cli(str(image), "--json", "--models", str(models), "--draw", "Effusion", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["heatmap_labels"] == ["Effusion"] and len(record["peaks"]) == len(record["overlays"]) == 1
    assert record["peaks"][0] is None or len(record["peaks"][0]) == 2
    bad = run_cli(str(image), "--models", str(models), "--draw", "Lung")
    assert bad.returncode == 2 and "Lung" in bad.stderr
    assert CHEST_LABELS  # the labels --draw accepts are the card's


def test_block3_gradient_x_activation_is_what_switching_a_cell_off_costs_the_logit(tmp_path):
    """Each cell of the 8 × 8 map is, to first order, how much the finding's logit falls when that
    cell's block-3 features are scaled down: checked against the network's own tail."""
    import torch

    from diagnosis.heatmap import block3_gradient_x_activation
    from diagnosis.network import load_model

    _, network = load_model(make_models_dir(tmp_path) / "chest")
    network = network.double()  # float64: the first-order change is far below float32's resolution
    x = torch.from_numpy(rng.normal(size=(1, 1, 64, 64)))
    with torch.no_grad():
        block3, _ = network.forward_block3(x)
        assert torch.allclose(network.logits_from_block3(block3), network.forward_with_features(x)[0], atol=1e-5)
    heat = block3_gradient_x_activation(network, block3[0].numpy(), [2, 5])
    assert heat.shape == (2, 4, 4)  # 64 px input: block 3 is input / 16
    eps = 1e-4
    for row, column in ((0, 0), (1, 2), (3, 3)):
        dimmed = block3.clone()
        dimmed[0, :, row, column] *= 1 - eps
        with torch.no_grad():
            change = (network.logits_from_block3(dimmed) - network.logits_from_block3(block3))[0].double()
        for k, index in enumerate((2, 5)):
            assert float(change[index]) == pytest.approx(-eps * heat[k, row, column], rel=0.01, abs=1e-12)


def test_the_pipeline_draws_the_block3_map_relative_to_its_normal_mean(tmp_path):
    """The shipped card's method: the overlay is the 8 × 8 block-3 map minus the card's normal mean,
    and ``peaks`` is its hottest point; a film equal to the normal mean is neutral (no red)."""
    from diagnosis.heatmap import BLOCK3_METHOD, block3_gradient_x_activation, upsampled

    models = make_models_dir(tmp_path / "a", positives=())
    pipeline = Pipeline.load(models)
    chest = pipeline.abnormality["chest"]
    assert chest.baseline.needs_block3 and chest.card.heatmap.method == BLOCK3_METHOD
    index = CHEST_LABELS.index("Mass")
    film = decode_film(IMAGE)
    _, _, block3 = chest.runner(chest.prepare(film)[None], block3=True)
    own = block3_gradient_x_activation(chest.network, block3[0], [index])[0]
    assert own.shape == (4, 4) and np.ptp(own) > 0
    # A normal mean far below this film: all red, the peak at the map's hottest cell.
    add_heatmap_baseline(models / "chest", mean=own.min() - 10 * np.ptp(own), scale=100 * np.ptp(own))
    result = Pipeline.load(models).run(IMAGE, draw=["Mass"]).result
    big = upsampled(own, 64, 64)
    row, column = np.unravel_index(int(np.argmax(big)), big.shape)
    height, width = film.shape
    assert result.peaks[0] == [int((column + 0.5) * width / 64), int((row + 0.5) * height / 64)]
    # The normal mean equal to this film's own map: nothing to show, so no red and no peak.
    means = np.zeros((len(CHEST_LABELS), 4, 4), np.float32)
    means[index] = own
    add_heatmap_baseline(models / "chest", mean=means, scale=1.0)
    result = Pipeline.load(models).run(IMAGE, draw=["Mass"]).result
    assert result.peaks == [None]


def decode_film(data: bytes) -> np.ndarray:
    from diagnosis.intake import decode
    from diagnosis.photo import models_view

    return models_view(decode(data)).gray
