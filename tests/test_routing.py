"""The orientation head's fitting command and the routing measurement, on stand-in models and a tiny pack."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from model_factory import make_models_dir
from PIL import Image
from tiny_pack import run_training, write_tiny_pack

from diagnosis.cards import read_card
from diagnosis.pipeline import Pipeline
from training.card.orientation import turned_view
from training.measure.routing import turn


def write_film(path, seed, size=(96, 72)):
    """A portrait 'film' with a bright band at its top: which way up it is shows in its pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(40, 140, (size[0], size[1])).astype(np.uint8)
    pixels[: size[0] // 4] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def film_pack(tmp_path_factory):
    def film(split, index, path):
        write_film(path, hash((split, index)) % 1000)
        return index % 4 != 0, ("chest", "hand", "hip")[index % 3], None

    return write_tiny_pack(tmp_path_factory.mktemp("films"), {"train": 16, "val": 8, "test": 6}, film)


def test_turn_keeps_the_whole_film_and_black_corners():
    film = np.full((40, 60), 200, np.uint8)
    assert turn(film, 90).shape == (60, 40) and turn(film, 180).shape == (40, 60)
    tilted = turn(film, 15)
    assert tilted.shape[0] > 40 and tilted.shape[1] > 60 and tilted[0, 0] == 0 and tilted[tilted.shape[0] // 2,
                                                                                            tilted.shape[1] // 2] == 200


def test_orientation_command_writes_a_card_section_the_pipeline_loads(film_pack, tmp_path):
    models = make_models_dir(tmp_path / "models")
    proc = run_training("orientation", "--model", str(models / "gate"), "--manifest", str(film_pack),
                        "--cache", str(tmp_path / "cache"))
    report = json.loads(proc.stdout)
    card = read_card(models / "gate")
    assert card.orientation is not None and card.orientation.classes == ["0", "90", "180", "270", "not_xray"]
    assert 0.4 <= card.orientation.min_probability <= 0.95
    # Turns on trial and the not-X-ray refusal are chosen on val (or left off), with the curve behind it.
    spec = card.orientation
    assert spec.confirm_min_probability is None or 0.4 <= spec.confirm_min_probability < spec.min_probability
    assert spec.not_xray_min_probability is None or 0.3 <= spec.not_xray_min_probability <= 0.95
    assert set(spec.metrics["not_xray_floor_curve_val"]) == {"None", "0.9", "0.7", "0.5", "0.4", "0.3"}
    assert spec.search_upright_below is None and "search_curve_val" not in spec.metrics  # not asked for
    assert report["min_probability"] == card.orientation.min_probability
    # Reported per turn on val and test, for radiographs and non-X-rays, before and after.
    val = card.orientation.metrics["val"]
    assert set(val["radiographs"]["upright_after"]) == {"0", "90", "180", "270"}
    assert val["not_xray"]["n"] == 2 and val["radiographs"]["n"] == 6
    # Every other section of the card is kept, and the pipeline runs with the head.
    assert card.thresholds == {"xray": 0.5} and card.positive_label == "xray"
    result = Pipeline.load(models).run((film_pack.parent / "images/test_1.png").read_bytes()).result
    assert result.outcome == "analysed" and result.turned in (0, 90, 180, 270)


def test_mirrored_view_is_the_mirror_image_turned(tmp_path):
    film = tmp_path / "film.png"
    write_film(film, 3)
    upright = turned_view(f"{film}#0")
    assert np.array_equal(turned_view(f"{film}#m0"), upright[:, ::-1])
    assert np.array_equal(turned_view(f"{film}#m90"), np.rot90(upright[:, ::-1]))


def test_mirror_fits_the_head_on_the_train_radiographs_mirror_images_too(film_pack, tmp_path):
    notes = {}
    for mirror in (False, True):
        models = make_models_dir(tmp_path / f"models{mirror}")
        run_training("orientation", "--model", str(models / "gate"), "--manifest", str(film_pack),
                     "--cache", str(tmp_path / "cache"), *(["--mirror"] if mirror else []))
        notes[mirror] = read_card(models / "gate").orientation.method_notes
    # train: 16 pictures, each at 4 turns; mirrored: 16 more at 4 turns (X-rays by turn, the rest "not_xray").
    assert "; 64 train pictures" in notes[False] and "mirror" not in notes[False]
    assert "; 128 train pictures" in notes[True] and "and their mirror images" in notes[True]
    assert notes[True].endswith("--mirror")


def test_synthetic_fits_the_head_on_the_synthetic_train_photos_too(film_pack, tmp_path):
    # A synthetic-photos manifest (source "synthetic_<source>"): 3 train pictures and 1 val picture.
    synthetic = tmp_path / "synthetic" / "manifest.csv"
    synthetic.parent.mkdir()
    rows = film_pack.read_text().splitlines()
    picked = [r for r in rows[1:] if r.split(",")[2] == "train"][:3] + [r for r in rows[1:] if ",val," in r][:1]
    lines = [",".join([str(film_pack.parent / r.split(",")[0]), "synthetic_tiny", *r.split(",")[2:]]) for r in picked]
    synthetic.write_text("\n".join([rows[0], *lines]) + "\n")
    notes = {}
    for flag in ((), ("--synthetic",)):
        models = make_models_dir(tmp_path / f"models{len(flag)}")
        run_training("orientation", "--model", str(models / "gate"), "--manifest", str(film_pack), "--manifest",
                     str(synthetic), "--cache", str(tmp_path / "cache"), *flag)
        notes[flag] = read_card(models / "gate").orientation
    # Without the flag synthetic photos are left out; with it the train ones join the fit, never val or test.
    assert "; 64 train pictures" in notes[()].method_notes
    assert "; 76 train pictures" in notes[("--synthetic",)].method_notes
    assert notes[("--synthetic",)].metrics["val"]["radiographs"]["n"] == notes[()].metrics["val"]["radiographs"]["n"]


def test_keep_head_chooses_only_the_search_and_keeps_the_head(film_pack, tmp_path):
    models = make_models_dir(tmp_path / "models")
    cache = str(tmp_path / "cache")
    run_training("orientation", "--model", str(models / "gate"), "--manifest", str(film_pack), "--cache", cache)
    before = read_card(models / "gate").orientation
    run_training("orientation", "--model", str(models / "gate"), "--manifest", str(film_pack), "--cache", cache,
                 "--keep-head", "--search-below", "0.5,0.9", "--search-floor", "0.7,0.95")
    after = read_card(models / "gate").orientation
    fields = ("min_probability", "min_probability_refused", "confirm_min_probability", "confirm_upright_probability",
              "not_xray_min_probability")
    assert after.arrays.sha256 == before.arrays.sha256
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
    # The search's floors come from the grid given, a floor never below "below" (or no search at all).
    assert set(after.metrics["search_curve_val"]) == {"0.5,0.7", "0.5,0.95", "0.9,0.95"}
    assert after.search_upright_below in (None, 0.5, 0.9) and after.search_upright_probability in (0.5, 0.7, 0.95)
    assert after.search_consensus_probability is None  # not asked for
    assert "--keep-head" in after.method_notes
    # With the vote in the grid, every (below, floor, consensus) is tried, the floor below "below" too.
    run_training("orientation", "--model", str(models / "gate"), "--manifest", str(film_pack), "--cache", cache,
                 "--keep-head", "--search-below", "0.9", "--search-floor", "0.5", "--search-consensus", "none,0.6")
    voted = read_card(models / "gate").orientation
    assert set(voted.metrics["search_curve_val"]) == {"0.9,0.5,0.6"}
    assert voted.search_consensus_probability in (None, 0.6) and voted.arrays.sha256 == before.arrays.sha256


def test_routing_counts_what_the_reply_names_per_group_and_turn(film_pack, tmp_path):
    models = make_models_dir(tmp_path / "models", body_part="chest")  # names every X-ray "chest"
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "-m", "training", "measure-routing", "--manifest", str(film_pack),
                           "--split", "val", "--angles", "0,90", "--models", str(models), "--synthetic-per-part", "1",
                           "--json", str(out), "--misses"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| group | n | 0° | 90° |" in proc.stdout
    report = json.loads(out.read_text())
    groups = report["by_angle"]["0"]["groups"]
    # val: 8 images, indices 1-3 and 5-7 X-rays (chest, hand, hip by index % 3), 0 and 4 not.
    assert groups["film:chest"] == {"n": 2, "right": 1.0, "outcomes": {"named_right": 2}, "turned": 0}
    assert groups["film:hand"]["right"] == 0.0 and groups["film:hand"]["outcomes"] == {"named_wrong": 2}
    assert groups["unknown:hip"]["outcomes"] == {"called_chest": 2}
    assert groups["synthetic_photo:chest"]["n"] == 1
    assert report["by_angle"]["0"]["overall"]["unknown"] == {"n": 2, "right": 0.0, "called_chest": 2,
                                                             "named_wrong": 0}
    # The stand-in gate accepts everything: non-X-rays are "accepted", never right.
    assert groups["not_xray:natural_photo"]["right"] == 0.0
    assert set(report["by_angle"]) == {"0", "90"}
    # --misses: every image the reply got wrong, with its scores; none it got right.
    misses = report["by_angle"]["0"]["misses"]
    assert sorted(m["group"] for m in misses if m["group"].startswith(("film:", "unknown:"))) == [
        "film:hand", "film:hand", "unknown:hip", "unknown:hip"]
    assert all(m["body_part"] == "chest" and m["body_part_probability"] is not None for m in misses
               if m["group"] == "film:hand")
    assert "0° miss: group=film:hand" in proc.stdout


# Issue #21: good films turned away. One test per rule.

def _implant_film(size=250):
    """A digital film (gray, under 400 px) with a small saturated blob clear of the edge on a dark
    surround: what a shoulder implant looks like, and what a lamp's reflection looks like in a photo."""
    rng = np.random.default_rng(3)
    film = rng.integers(30, 120, (size, size)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    film[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= (size // 12) ** 2] = 255
    return film


def test_glare_is_asked_of_photos_only():
    from diagnosis.photo import rectify
    from diagnosis.quality import check_quality

    film = _implant_film()
    assert "glare" in check_quality(film, rectify(film, photographed=False), photographed=True)
    assert "glare" not in check_quality(film, rectify(film, photographed=False), photographed=False)


def test_a_digital_film_with_an_implant_is_read_not_sent_back(tmp_path):
    import io

    models = make_models_dir(tmp_path / "models")
    buffer = io.BytesIO()
    Image.fromarray(_implant_film()).save(buffer, format="PNG")
    result = Pipeline.load(models).run(buffer.getvalue()).result
    assert result.outcome == "analysed" and not result.photographed and result.retake == []
    # A large gray file (a 1,230 px shoulder file with an implant; the pack's 512 px spine files),
    # even saved as RGB, is no photo: no film outline in it, no camera colour. It is read.
    large = io.BytesIO()
    Image.fromarray(np.dstack([_implant_film(640)] * 3)).save(large, format="PNG")
    result = Pipeline.load(models).run(large.getvalue()).result
    assert result.outcome == "analysed" and not result.photographed and result.retake == []
    # The same picture with a camera's colour cast is a photo: the bright blob may be a lamp's reflection.
    cast = np.dstack([_implant_film(640)] * 3).astype(np.int16) + np.array([6, 0, -6])
    photo = io.BytesIO()
    Image.fromarray(np.clip(cast, 0, 255).astype(np.uint8)).save(photo, format="PNG")
    result = Pipeline.load(models).run(photo.getvalue()).result
    assert result.photographed and result.outcome == "retake" and "glare" in result.retake


def test_retake_words_fit_what_was_sent():
    from diagnosis.messages import render_reply
    from diagnosis.report import DiagnosisResult

    file = render_reply(DiagnosisResult(outcome="retake", is_xray=True, retake=["too_dark"]), "en")
    photo = render_reply(DiagnosisResult(outcome="retake", is_xray=True, retake=["too_dark"], photographed=True), "en")
    assert "photo is not" not in file and "original file" in file
    assert "The photo is not good enough" in photo and "original file" not in photo


def _scores(rng, n, centre, spread=0.1):
    return np.abs(rng.normal(centre, spread, n))


def test_curve_keeps_far_good_films_but_never_names_a_held_out_part_chest():
    from training.card.open_set import choose_on_curve

    rng = np.random.default_rng(0)
    labels = ["chest", "hand"]

    def probs(n, part, confidence=0.995):
        row = np.full((n, 2), 1 - confidence)
        row[:, labels.index(part)] = confidence
        return row

    # Val films: most near 1.0, a tail out to 1.6 (the tail a 97 % quantile would refuse).
    chest, hand = _scores(rng, 200, 1.0), np.r_[_scores(rng, 90, 1.0), np.linspace(1.3, 1.6, 10)]
    known = {"val_films": (np.r_[probs(200, "chest"), probs(100, "hand")], np.r_[chest, hand],
                           np.zeros(300, bool), np.array(["chest"] * 200 + ["hand"] * 100))}
    # Hold-out: one film at 2.4 the classifier calls chest, the rest far out.
    holdout = (np.r_[probs(1, "chest"), probs(19, "hand")], np.r_[2.4, np.full(19, 9.0)], np.zeros(20, bool))
    chosen = choose_on_curve(known, holdout, None, None, labels, 0.6, max_wrong=0.10)
    assert chosen["kept"] == 1.0 and chosen["kept_by_set"]["val_films"] == 1.0  # the tail is kept
    assert 1.6 <= chosen["threshold"] < 2.4  # ... and the held-out "chest" refused
    assert chosen["holdout_called_chest"] == 0 and chosen["holdout_wrong_part_rate"] <= 0.10
    # The fixed 97 % point would have refused most of the tail.
    assert (hand[90:] > np.quantile(np.r_[chest, hand], 0.97)).sum() >= 8


def test_a_measuring_pipeline_can_read_past_the_quality_check(tmp_path):
    """``refuse_bad_shots=False`` (``measure-quality --cost``) reads a picture the check would send back."""
    import io

    dark = io.BytesIO()
    Image.fromarray(np.full((200, 200), 12, np.uint8)).save(dark, format="PNG")
    pipeline = Pipeline.load(make_models_dir(tmp_path / "models"))
    sent_back = pipeline.run(dark.getvalue()).result
    assert sent_back.outcome == "retake" and sent_back.retake == ["too_dark"]
    pipeline.refuse_bad_shots = False
    assert pipeline.run(dark.getvalue()).result.outcome == "analysed"


def test_gate_refit_measures_the_shipped_layer_and_each_variant_without_writing(film_pack, tmp_path):
    models = make_models_dir(tmp_path / "models")
    before = (models / "gate" / "card.json").read_text()
    proc = run_training("measure-gate-refit", "--model", str(models / "gate"), "--manifest", str(film_pack),
                        "--synthetic-train", str(film_pack), "--synthetic-val", str(film_pack),
                        "--cache", str(tmp_path / "cache"))
    report = json.loads(proc.stdout)
    assert report["shipped"]["threshold"] == 0.5 and len(report["variants"]) == 5
    for variant in report["variants"]:
        for reading in (variant["youden"], variant["non_xray_kept"]):
            assert {f"non_xray_refused_{t}" for t in (0, 90, 180, 270)} <= set(reading)
    # Kept at every turn by construction of the second threshold.
    kept = report["variants"][1]["non_xray_kept"]
    assert all(kept[f"non_xray_refused_{t}"] >= report["shipped"][f"non_xray_refused_{t}"] for t in (0, 90, 180, 270))
    assert (models / "gate" / "card.json").read_text() == before


def test_routing_sends_synthetic_photos_as_a_messenger_would_in_colour(film_pack, tmp_path):
    """``--sent-photos``: the synthetic photos are cropped to the film and re-compressed, and reach the
    pipeline in colour (so the service judges them as photos), turned or tilted like the rest."""
    models = make_models_dir(tmp_path / "models", body_part="chest")
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "-m", "training", "measure-routing", "--manifest", str(film_pack),
                           "--split", "val", "--angles", "15", "--models", str(models), "--synthetic-per-part", "1",
                           "--sent-photos", "--json", str(out), "--misses"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sent_photos"] is True
    photos = [m for m in report["by_angle"]["15"]["misses"] if m["group"].startswith("synthetic_photo:")]
    assert photos and all(m["photographed"] for m in photos)  # the hand photo, named "chest" by the stand-in
