"""The shipped models on real pack images (test split): routes, findings, overlay, CLI on the example."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from diagnosis.cards import read_card
from diagnosis.messages import render_reply
from diagnosis.pipeline import Pipeline

MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.load(MODELS, backend="torch")


def test_model_folders_verify():
    for name in ("gate", "body_part", "chest"):
        card = read_card(MODELS / name)  # sha256 checked
        assert card.metrics["test"]["n"] > 0
        assert card.data_sources and card.training["hardware"]


def pack_rows(pack, predicate, limit=10):
    with (pack / "manifest.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test" and predicate(row)]
    return rows[:: max(1, len(rows) // limit)][:limit]  # spread over the split, not its first rows


@pytest.mark.parametrize(("name", "predicate", "expected"), [
    ("chest", lambda r: r["body_part"] == "chest", ("analysed", "chest")),
    ("hand", lambda r: r["body_part"] == "hand", ("body_part_not_analysed", "hand")),
    ("knee", lambda r: r["body_part"] == "knee", ("body_part_not_analysed", "knee")),
    ("natural photo", lambda r: r["kind"] == "natural_photo", ("not_xray", None)),
    ("fundus photo", lambda r: r["kind"] == "fundus_photo", ("not_xray", None)),
])
def test_pack_images_are_routed(pipeline, pack, name, predicate, expected):
    rows = pack_rows(pack, predicate)
    assert rows, name
    routed = [pipeline.run((pack / row["path"]).read_bytes(), file=row["path"]).result for row in rows]
    correct = [(r.outcome, r.body_part) == expected for r in routed]
    assert sum(correct) >= 0.8 * len(rows), [(r.file, r.outcome, r.body_part) for r in routed]


def test_chest_image_gets_findings_and_overlay(pipeline, pack):
    row = pack_rows(pack, lambda r: r["body_part"] == "chest", 1)[0]
    analysis = pipeline.run((pack / row["path"]).read_bytes())
    assert analysis.result.outcome == "analysed"
    assert len(analysis.result.findings) == 14 and analysis.overlays
    assert "physician" in render_reply(analysis.result)


def test_readme_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diagnosis.cli", "examples/chest_xray.jpg", "--json", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["body_part"] == "chest" and line["findings"] and line["overlay"]


def _reencode(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_no_shortcut_sharp_chest_is_still_chest_blurry_gray_photo_still_not_xray(pipeline, pack):
    """Shortcut check: the pack's chest images are small and soft, photos are colour — the models must not
    have learnt "soft = chest" or "colour = not X-ray"."""
    from PIL import Image, ImageFilter

    chests = pack_rows(pack, lambda r: r["body_part"] == "chest")
    sharp = [Image.open(pack / r["path"]).convert("L").resize((512, 512), Image.Resampling.BICUBIC)
             .filter(ImageFilter.UnsharpMask(radius=2, percent=150)) for r in chests]
    routed = [pipeline.run(_reencode(image)).result.body_part for image in sharp]
    assert routed.count("chest") >= 0.8 * len(chests), routed

    photos = pack_rows(pack, lambda r: r["kind"] in ("natural_photo", "clothing_photo", "face_photo"), 12)
    soft_gray = [Image.open(pack / r["path"]).convert("L").resize((128, 128)).filter(ImageFilter.GaussianBlur(1))
                 for r in photos]
    outcomes = [pipeline.run(_reencode(image)).result.outcome for image in soft_gray]
    assert outcomes.count("not_xray") >= 0.8 * len(photos), outcomes
