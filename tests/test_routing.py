"""The orientation head's fitting command and the routing measurement, on stand-in models and a tiny pack."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from model_factory import make_models_dir
from PIL import Image

from diagnosis.cards import read_card
from diagnosis.pipeline import Pipeline
from training.data.datasets import CHEST_LABELS
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
    root = tmp_path_factory.mktemp("films")
    rows = []
    for split, count in (("train", 16), ("val", 8), ("test", 6)):
        for index in range(count):
            name = f"images/{split}_{index}.png"
            xray = index % 4 != 0
            part = ("chest", "hand", "hip")[index % 3] if xray else ""
            write_film(root / name, hash((split, index)) % 1000)
            rows.append([name, "tiny", split, int(xray), part, f"p{index}", 0,
                         "radiograph" if xray else "natural_photo", *([0] * 14)])
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "split", "is_xray", "body_part", "patient_id", "phone_photo", "kind",
                         *CHEST_LABELS])
        writer.writerows(rows)
    return root / "manifest.csv"


def run_training(*args):
    proc = subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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
    assert report["min_probability"] == card.orientation.min_probability
    # Reported per turn on val and test, for radiographs and non-X-rays, before and after.
    val = card.orientation.metrics["val"]
    assert set(val["radiographs"]["upright_after"]) == {"0", "90", "180", "270"}
    assert val["not_xray"]["n"] == 2 and val["radiographs"]["n"] == 6
    # Every other section of the card is kept, and the pipeline runs with the head.
    assert card.thresholds == {"xray": 0.5} and card.positive_label == "xray"
    result = Pipeline.load(models).run((film_pack.parent / "images/test_1.png").read_bytes()).result
    assert result.outcome == "analysed" and result.turned in (0, 90, 180, 270)


def test_routing_counts_what_the_reply_names_per_group_and_turn(film_pack, tmp_path):
    models = make_models_dir(tmp_path / "models", body_part="chest")  # names every X-ray "chest"
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "-m", "training", "measure-routing", "--manifest", str(film_pack),
                           "--split", "val", "--angles", "0,90", "--models", str(models), "--synthetic-per-part", "1",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
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
