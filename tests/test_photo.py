"""Phone photos of films (issue #7): finding and straightening the film, quality checks, synthetic photos."""

from __future__ import annotations

import csv
import json
import time

import cv2
import numpy as np
import pytest
from conftest import PACK
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from diagnosis.intake import decode
from diagnosis.messages import ADVICE
from diagnosis.photo import Rectified, models_view, rectify
from diagnosis.quality import CODES, check_quality
from training.data.synthetic_photos import main as synthetic_main
from training.data.synthetic_photos import synthesise, synthesise_with_corners, to_gray
from training.measure.quality import degrade


def pack_rows(**wanted: str) -> list[dict[str, str]]:
    with (PACK / "manifest.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if all(row[k] == v for k, v in wanted.items())]


def load(row: dict[str, str]) -> np.ndarray:
    """Through the intake, as the pipeline does (colour phone photos become 8-bit gray)."""
    return decode((PACK / row["path"]).read_bytes()).gray


@pytest.fixture(scope="module")
def chest_images(pack) -> list[np.ndarray]:
    return [load(row) for row in pack_rows(split="test", body_part="chest")[:24:3]]


@pytest.fixture(scope="module")
def radiographs(pack) -> dict[str, np.ndarray]:
    """One test-split radiograph per body part, plus a real phone photo of a film."""
    chosen: dict[str, np.ndarray] = {}
    for row in pack_rows(split="test", is_xray="1"):
        key = f"{row['body_part']}-photo" if row["phone_photo"] == "1" else row["body_part"]
        if key not in chosen:
            chosen[key] = load(row)
    return chosen


def corner_error(found: np.ndarray, truth: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest corner distance as a fraction of the image's long side."""
    return float(np.abs(found - truth).max()) / max(shape)


@pytest.mark.parametrize("scene", ["lightbox", "window", "printout"])
def test_film_in_a_synthetic_photo_is_found_and_straightened(radiographs, scene):
    photo, truth = synthesise_with_corners(radiographs["hip"], np.random.default_rng(2), scene=scene)
    gray = to_gray(photo)
    result = rectify(gray)
    assert result.rectified and result.corners is not None
    assert corner_error(result.corners, truth, gray.shape) < 0.05
    assert result.film_fraction == pytest.approx(cv2.contourArea(truth) / gray.size, rel=0.2)
    # Upright, cropped to the film, contrast stretched, at full resolution.
    height, width = result.gray.shape
    assert width == pytest.approx(np.linalg.norm(truth[1] - truth[0]), rel=0.1)
    assert height == pytest.approx(np.linalg.norm(truth[3] - truth[0]), rel=0.1)
    assert result.gray.dtype == np.uint8
    assert int(result.gray.min()) <= 5 and int(result.gray.max()) >= 250


def test_most_synthetic_photos_are_found(chest_images):
    """The rate, not one lucky case. Measured on 150 val photos: 82 % of light box, window and print
    photos within 5 % (misses: a white film edge on a white panel or window leaves no edge to find;
    monitors, not tested here, 44 %: the film's dark margin melts into the viewer's background)."""
    errors = []
    for seed, gray in enumerate(chest_images):
        for scene in ("lightbox", "window", "printout"):
            photo, truth = synthesise_with_corners(gray, np.random.default_rng(100 + seed), scene=scene)
            result = rectify(to_gray(photo))
            errors.append(corner_error(result.corners, truth, photo.shape) if result.rectified else 1.0)
    assert np.mean(np.array(errors) < 0.05) >= 0.7, np.round(errors, 3)  # this sample: 18 / 24


def test_digital_radiographs_are_left_untouched(radiographs):
    for name, gray in radiographs.items():
        if name.endswith("-photo"):
            continue
        result = rectify(gray)
        assert result.gray is gray, name  # the very same array: the models see exactly the file
        assert not result.rectified and result.corners is None and result.film_fraction == 1.0


def test_borderless_dicom_is_left_untouched(chest_images):
    from dicom_factory import make_dicom

    pixels = cv2.resize(chest_images[0], (512, 512), interpolation=cv2.INTER_CUBIC).astype(np.uint16) * 16
    gray = decode(make_dicom(pixels, bits=12)).gray
    result = rectify(gray)
    assert result.gray is gray and not result.rectified


def test_letterbox_padding_of_an_exported_file_is_not_a_film(chest_images):
    padded = cv2.copyMakeBorder(cv2.resize(chest_images[1], (300, 300)), 0, 0, 80, 80, cv2.BORDER_CONSTANT, value=0)
    assert rectify(padded).gray is padded


def turned_on_black(gray: np.ndarray, angle: float, with_matrix: bool = False):
    """The film turned by ``angle`` degrees (counter-clockwise) inside black corners, nothing cut off
    (and the 2×3 matrix from the film's pixels to the turned picture's, ``with_matrix``)."""
    height, width = gray.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    size = (int(height * sin + width * cos), int(height * cos + width * sin))
    matrix[:, 2] += (size[0] - width) / 2, (size[1] - height) / 2
    turned = cv2.warpAffine(gray, matrix, size, flags=cv2.INTER_LINEAR, borderValue=0)
    return (turned, matrix) if with_matrix else turned


def test_small_gray_digital_films_sent_as_jpeg_pass_the_photo_step_untouched(pack):
    """A 128 px NIH film sent as a JPEG is a digital radiograph: no film is searched for inside it (the
    search used to find one in the anatomy and crop a 127 × 51 strip)."""
    for row in pack_rows(split="val", body_part="chest")[:120]:
        data = (PACK / row["path"]).read_bytes()
        decoded = decode(encode_jpeg(decode(data).gray))
        view = models_view(decoded)
        assert not decoded.colour and view.gray is decoded.gray and not view.rectified, row["path"]


def test_a_colour_phone_photo_is_still_searched_for_a_film(radiographs):
    photo = synthesise_with_corners(radiographs["chest"], np.random.default_rng(3), scene="lightbox")[0]
    decoded = decode(encode_jpeg(photo))
    assert decoded.colour and models_view(decoded).rectified


def test_what_is_a_photo(radiographs):
    """A phone photo is colour, or has a film found in it; a large gray file with no film outline is
    a digital file (the pack's 512 px spine and 1024 px dental files: no glare asked, the original
    file asked for), and so is a film only turned back on its padding."""
    for part in ("spine", "dental"):
        film = radiographs[part]
        assert max(film.shape) >= 400  # large enough to be searched for a film
        decoded = decode(encode_jpeg(film))
        assert not decoded.colour and not models_view(decoded).photographed, part
    real = decode((PACK / pack_rows(split="test", phone_photo="1")[0]["path"]).read_bytes())
    assert real.colour and models_view(real).photographed  # the pack's real photos: colour, none straightened
    gray_photo = to_gray(synthesise_with_corners(radiographs["chest"], np.random.default_rng(3), scene="lightbox")[0])
    view = models_view(decode(encode_jpeg(gray_photo)))
    assert view.rectified and view.photographed
    tilted = models_view(decode(encode_jpeg(turned_on_black(radiographs["chest"], 15))))
    assert tilted.rectified and not tilted.photographed


def test_a_dark_digital_file_is_windowed_to_its_range_and_a_dark_photo_is_not(radiographs):
    """A dark file (a detector's raw window) is read after a viewer's window/level: on val its dark
    copies were named right as often as the films. One with too few gray levels left, and a dark
    photo (missing light, not windowing), keep the "too dark" advice."""
    film = radiographs["knee"]  # gray levels 16–241
    dark = (film.astype(np.float32) * 0.12).astype(np.uint8)  # 1–28
    view = models_view(decode(encode_png(dark)))
    assert view.brightened and not view.photographed and not view.rectified
    assert np.percentile(view.gray, 99) > 200 and np.percentile(dark, 99) < 40  # the film's range again
    assert check_quality(dark, view, view.photographed, 128) == []
    # Untouched where it is not dark: the very same array.
    bright = decode(encode_png(film))
    assert models_view(bright).gray is bright.gray and not models_view(bright).brightened
    flat = (film.astype(np.float32) * 0.04).astype(np.uint8)  # ~10 gray levels: nothing to recover
    view = models_view(decode(encode_png(flat)))
    assert not view.brightened and check_quality(flat, view, view.photographed, 128) == ["too_dark"]
    photo = decode(encode_jpeg(np.dstack([dark] * 3) + np.uint8([6, 2, 0])))  # a colour cast: a camera's
    view = models_view(photo)
    assert photo.colour and view.photographed and not view.brightened
    assert "too_dark" in check_quality(photo.gray, view, view.photographed, 128)


@pytest.mark.parametrize("angle", [-20, -15, -8, 8, 15, 20])
def test_a_film_tilted_on_black_is_straightened_whatever_its_size(radiographs, angle):
    film = radiographs["chest"]  # 128 px: too small to be searched as a photo
    tilted = turned_on_black(film, angle)
    view = models_view(decode(encode_jpeg(tilted)))
    assert view.rectified
    top_left, top_right = view.corners[0], view.corners[1]
    assert abs(np.degrees(np.arctan2(top_right[1] - top_left[1], top_right[0] - top_left[0])) + angle) < 1.5
    # The film's own size, give or take the thin blurred black edge (JPEG ringing) the deskew keeps.
    assert np.all(np.abs(np.array(view.gray.shape) - film.shape) <= 0.12 * max(film.shape))


@pytest.mark.parametrize(("angle", "scene"), [(-20, "lightbox"), (-15, "window"), (15, "printout"),
                                            (20, "lightbox")])
def test_the_film_inside_a_photo_turned_on_black_is_searched_for_again(radiographs, angle, scene):
    """A whole phone photo turned inside black corners (issue #27): the deskew straightens the photo,
    then the film inside it is found as in any photo (it used to stop at the photo's outline)."""
    photo, truth = synthesise_with_corners(radiographs["hip"], np.random.default_rng(2), scene=scene)
    gray = to_gray(photo)
    tilted, matrix = turned_on_black(gray, angle, with_matrix=True)
    truth = cv2.transform(truth.reshape(-1, 1, 2), matrix).reshape(4, 2)
    view = models_view(decode(encode_jpeg(tilted)))
    assert view.rectified and corner_error(view.corners, truth, tilted.shape) < 0.05
    assert view.gray.shape[1] == pytest.approx(np.linalg.norm(truth[1] - truth[0]), rel=0.1)


@pytest.mark.parametrize("angle", [-15, 20])
def test_a_large_tilted_digital_film_is_straightened_whole(radiographs, angle):
    """A digital film big enough to be searched as a photo (a 1024 px panoramic), turned on black: the
    search inside the straightened film finds no smaller "film" in the anatomy; the whole film stays."""
    film = radiographs["dental"]
    assert max(film.shape) >= 400  # searched as a photo would be
    view = models_view(decode(encode_jpeg(turned_on_black(film, angle))))
    assert view.rectified
    assert np.all(np.abs(np.array(view.gray.shape) - film.shape) <= 0.05 * max(film.shape))


@pytest.mark.parametrize("angle", [-20, -15, 15, 20])
def test_a_turned_film_whose_own_edge_is_partly_black_is_straightened_whole(radiographs, angle):
    """A film with a black band along its side (a shoulder film's dark surround) turned inside a grown
    canvas: its outline on the padding is no rectangle, but its corners touch the picture's sides."""
    film = radiographs["chest"].copy()
    film[:, : film.shape[1] * 3 // 10] = 0
    view = models_view(decode(encode_jpeg(turned_on_black(film, angle))))
    assert view.rectified
    assert np.all(np.abs(np.array(view.gray.shape) - film.shape) <= 0.06 * max(film.shape))


@pytest.mark.parametrize("angle", [-15, 20])
def test_a_straightened_digital_film_keeps_its_values_and_loses_the_black_edge(radiographs, angle):
    """Turned back, a dim digital film is neither contrast-stretched (that is for washed-out photos)
    nor framed by the padding's blurred edge: it looks like the film as sent."""
    film = (radiographs["chest"].astype(np.float32) * 0.5 + 20).astype(np.uint8)  # a dim film, 20–148
    view = models_view(decode(encode_jpeg(turned_on_black(film, angle))))
    assert view.rectified and int(view.gray.max()) <= int(film.max()) + 12
    border = np.concatenate([view.gray[0], view.gray[-1], view.gray[:, 0], view.gray[:, -1]]).astype(float)
    film_border = np.concatenate([film[0], film[-1], film[:, 0], film[:, -1]]).astype(float)
    assert abs(border.mean() - film_border.mean()) < 12
    same = cv2.resize(view.gray, film.shape[::-1], interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(same - film).mean() < 10


def test_a_tilted_silhouette_on_black_is_no_tilted_film():
    """An upright digital film whose anatomy lies on exact black (a hand on a black background) is
    left alone: the content neither fills a turned rectangle nor reaches one's sides."""
    gray = np.zeros((200, 200), np.uint8)
    cv2.ellipse(gray, (100, 100), (70, 35), 15, 0, 360, 160, -1)
    cv2.randn(noise := np.zeros_like(gray, dtype=np.float32), 0, 8)
    gray = np.where(gray > 0, np.clip(gray + noise, 10, 240), 0).astype(np.uint8)
    assert not models_view(decode(encode_jpeg(gray))).rectified


def test_an_upright_film_on_black_padding_or_a_slight_tilt_is_left_alone(radiographs):
    film = radiographs["chest"]
    for gray in (cv2.copyMakeBorder(film, 20, 20, 40, 40, cv2.BORDER_CONSTANT, value=0), turned_on_black(film, 1.0)):
        view = models_view(decode(encode_jpeg(gray)))
        assert not view.rectified


def encode_jpeg(gray: np.ndarray, format: str = "JPEG") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format=format, **({"quality": 90} if format == "JPEG" else {}))
    return buffer.getvalue()


def encode_png(gray: np.ndarray) -> bytes:
    return encode_jpeg(gray, "PNG")


def test_rectify_is_fast_on_a_phone_sized_photo(chest_images):
    photo, _ = synthesise_with_corners(chest_images[3], np.random.default_rng(5), scene="lightbox")
    gray = cv2.resize(to_gray(photo), (960, 1280))
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        rectify(gray)
        timings.append(time.perf_counter() - started)
    # Target < 15 ms on an idle 2-core machine; generous here because tests share the CPU.
    assert min(timings) < 0.05, timings


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.uint8, st.tuples(st.integers(64, 300), st.integers(64, 300)), elements=st.integers(0, 255)))
def test_rectify_and_quality_never_raise_on_noise(gray):
    result = rectify(gray)
    assert result.gray.dtype == np.uint8 and result.gray.ndim == 2
    assert set(check_quality(gray, result)) <= set(CODES)


@settings(max_examples=25, deadline=None)
@given(st.integers(64, 400), st.integers(64, 400), st.lists(
    st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.integers(0, 255)),
    min_size=1, max_size=6))
def test_rectify_never_raises_on_rectangles(height, width, boxes):
    """Structured inputs (flat boxes with hard edges) reach the quadrilateral and warp code paths."""
    gray = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1, value in boxes:
        cv2.rectangle(gray, (int(x0 * width), int(y0 * height)), (int(x1 * width), int(y1 * height)), value, -1)
    result = rectify(gray)
    assert result.gray.dtype == np.uint8 and min(result.gray.shape) >= 2
    check_quality(gray, result)


def test_quality_accepts_pack_radiographs(radiographs):
    for name, gray in radiographs.items():
        assert check_quality(gray, rectify(gray)) == [], name


@pytest.mark.parametrize("code", ["too_dark", "too_bright", "blurred", "glare", "film_too_small"])
def test_quality_refuses_bad_shots_with_the_right_code(chest_images, code):
    rng = np.random.default_rng(7)
    refused = 0
    for gray in chest_images[:4]:
        bad = degrade(gray, code, rng)
        refused += code in check_quality(bad, rectify(bad))
    assert refused >= 3  # measured on val: 93–100 % per code (film_too_small: ~90 %, the rest not found)


def test_dark_copies_go_through_the_service_pipeline_by_the_gray_levels_they_keep(pack):
    """``measure-quality --dark``: dark copies (JPEG files) beside the films, with the service's rules."""
    from training.measure.quality import dark_files

    report = dark_files(pack / "manifest.csv", "val", per_part=3, chest_films=30)
    groups = report["groups"]
    assert groups["film"]["n"] == 30 + 3 * 5  # 30 labelled chest films, 3 of each other known part
    windowed, too_few = groups.get("dark, windowed"), groups.get("dark, too few levels")
    assert windowed and too_few and windowed["n"] + too_few["n"] == groups["film"]["n"]
    assert set(too_few["outcomes"]) == {"retake"}  # too few levels: asked for the original file
    assert "retake" not in windowed["outcomes"] and windowed["named_right"] >= 0.75  # val: 0.984 of 385
    assert {"film", "dark"} <= set(report["chest_auc"])


def test_quality_refuses_a_film_with_too_few_pixels():
    film = np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))
    corners = np.float32([[10, 10], [60, 10], [60, 50], [10, 50]])
    found = Rectified(gray=film, rectified=True, corners=corners, film_fraction=0.3)
    assert "too_small" in check_quality(np.zeros((100, 100), np.uint8), found, input_side=128)
    # A picture as large as the models' input has pixels enough: its film was photographed from too far.
    large = check_quality(np.zeros((300, 300), np.uint8), found, input_side=128)
    assert "film_too_small" in large and "too_small" not in large


def test_every_code_has_advice():
    assert set(ADVICE) == set(CODES)
    assert all(text.endswith(".") for text in ADVICE.values())


def test_synthetic_photos_are_deterministic_for_a_seed(chest_images):
    first = synthesise(chest_images[0], np.random.default_rng(11))
    again = synthesise(chest_images[0], np.random.default_rng(11))
    other = synthesise(chest_images[0], np.random.default_rng(12))
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_a_sent_photo_is_the_same_photo_cropped_to_its_film_and_recompressed(chest_images):
    """``sent=True``: the sender's crop (a few per cent of surround left, or the film's edge cut), a
    messenger's re-compression to ≤ 1024 px; the photo underneath is the one the seed gives without it."""
    film = cv2.resize(chest_images[0], (900, 1100), interpolation=cv2.INTER_CUBIC)  # a large film: scaled down
    for seed in range(6):
        photo, corners = synthesise_with_corners(film, np.random.default_rng(seed))
        sent, sent_corners = synthesise_with_corners(film, np.random.default_rng(seed), sent=True)
        assert sent.ndim == 3 and max(sent.shape[:2]) <= 1024 and max(sent.shape[:2]) < max(photo.shape[:2])
        extent = corners.max(axis=0) - corners.min(axis=0)
        scale = (sent_corners.max(axis=0) - sent_corners.min(axis=0)) / extent
        assert np.allclose(scale, scale[0], rtol=0.02)  # the same film, only cropped and scaled
        # The film fills the picture: at most 6 % of its size left around it on any side (or cut).
        frame, film_size = np.float32([sent.shape[1], sent.shape[0]]), extent * scale
        left_over = np.r_[sent_corners.min(axis=0), frame - sent_corners.max(axis=0)]
        assert (left_over <= 0.06 * np.r_[film_size, film_size] + 2).all(), seed


def test_a_finger_enters_from_one_edge_in_skin_colour():
    from training.data.synthetic_photos import _finger

    gray = np.full((300, 200, 3), 128, np.uint8)
    for seed in range(5):
        held = _finger(gray, np.random.default_rng(seed)).astype(int)
        skin = (held[..., 0] - held[..., 2] > 25)  # warmer than the gray film
        assert 0.003 < skin.mean() < 0.25, seed
        rows, cols = np.nonzero(skin)
        assert min(rows.min(), cols.min()) == 0 or rows.max() == 299 or cols.max() == 199  # it enters at an edge


def test_synthetic_photo_cli_writes_a_pack_style_set(pack, tmp_path):
    assert synthetic_main(["--manifest", str(pack / "manifest.csv"), "--split", "test", "--out", str(tmp_path),
                           "--seed", "0", "--limit", "2", "--body-part", "chest"]) == 0
    with (tmp_path / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (pack / "manifest.csv").open(newline="") as handle:
        assert list(rows[0]) == csv.DictReader(handle).fieldnames
    assert len(rows) == 2 and all(r["phone_photo"] == "1" and r["body_part"] == "chest" for r in rows)
    assert Image.open(tmp_path / rows[0]["path"]).mode == "RGB"
    assert (tmp_path / "corners.csv").read_text().count("\n") == 3


def test_synthetic_photo_cli_takes_a_few_of_each_source_and_negatives(pack, tmp_path):
    assert synthetic_main(["--manifest", str(pack / "manifest.csv"), "--split", "val", "--out", str(tmp_path),
                           "--negatives", "--per-source", "1", "--workers", "2"]) == 0
    with (tmp_path / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources)) > 10 and all(s.startswith("synthetic_") for s in sources)
    negatives = [r for r in rows if r["is_xray"] == "0"]
    assert negatives and all(r["kind"] != "phone_photo_of_film" for r in negatives)
    assert all(r["kind"] == "phone_photo_of_film" for r in rows if r["is_xray"] == "1")
    again = tmp_path / "again"  # image i comes from seed (seed, i): the worker count changes nothing
    assert synthetic_main(["--manifest", str(pack / "manifest.csv"), "--split", "val", "--out", str(again),
                           "--negatives", "--per-source", "1"]) == 0
    assert (again / rows[3]["path"]).read_bytes() == (tmp_path / rows[3]["path"]).read_bytes()


def test_measure_photos_runs_on_stand_in_models(pack, fake_models, tmp_path):
    from training.measure.photos import main as measure_main

    out = tmp_path / "photos.json"
    assert measure_main(["--manifest", str(pack / "manifest.csv"), "--models", str(fake_models),
                         "--chest-limit", "6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    real = report["real_phone_photos"]
    assert real["test"]["images"] == 5 and real["val"]["images"] == 11
    assert real["test"]["gate_accuracy_as_sent"] == 1.0  # the stand-in gate says "X-ray" to everything
    synthetic = report["synthetic_chest_photos"]
    assert synthetic["images"] == 6
    assert {"chest_mean_auc_clean", "chest_mean_auc_synthetic", "chest_mean_auc_synthetic_rectified"} <= set(synthetic)
    assert synthetic["split"] == "test"

    # --chest-split val: the same figures on the val films (the split that chooses between models)
    with (pack / "manifest.csv").open(newline="") as handle:
        val_chest = [r for r in csv.DictReader(handle)
                     if r["split"] == "val" and r["body_part"] == "chest" and r.get("phone_photo") != "1"]
    assert measure_main(["--manifest", str(pack / "manifest.csv"), "--models", str(fake_models),
                         "--chest-limit", "6", "--chest-split", "val", "--json", str(out)]) == 0
    synthetic = json.loads(out.read_text())["synthetic_chest_photos"]
    assert synthetic["split"] == "val" and synthetic["images"] == min(6, len(val_chest)) > 0


def test_a_lamps_specular_reflection_is_caught_text_and_bright_bone_are_not(chest_images):
    from diagnosis.quality import specular_blob

    # Synthetic photos of the same films with and without a lamp's reflection (seeded): the
    # reflection earns "glare" on most (val: 61.5 %, see docs/photos.md), the clean photos on none.
    caught = clean_refused = 0
    for index, gray in enumerate(chest_images[:8]):
        for glare in (True, False):
            photo = to_gray(synthesise_with_corners(gray, np.random.default_rng([3, index]), glare=glare)[0])
            problems = check_quality(photo, rectify(photo))
            caught += glare and "glare" in problems
            clean_refused += not glare and "glare" in problems
    assert caught >= 3 and clean_refused == 0
    yy, xx = np.mgrid[0:256, 0:256]
    hill = 90 + 170 * np.exp(-((xx - 170) ** 2 + (yy - 170) ** 2) / (2 * 60.0**2))  # broad bright bone
    film = np.clip(hill, 0, 255).astype(np.uint8)
    cv2.putText(film, "R 11.6 cm", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 255, 2)  # a marker: thin strokes
    assert specular_blob(film) == 0.0
    cv2.circle(film, (50, 200), 8, 255, -1)  # a compact saturated peak on dark film
    assert specular_blob(film) > 0.0
