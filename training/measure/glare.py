"""Does the quality check catch a lamp's reflection on a photographed film, without refusing good images?

    python -m training measure-glare --manifest ../shared/data/xray-pack/manifest.csv --split val [--choose]
    python -m training measure-glare --manifest ../shared/data/xray-pack/manifest.csv --split test

Groups (all of ``--split``): the pack's digital radiographs (no phone photos), its real phone photos
of films, and synthetic phone photos (``training.data.synthetic_photos``, per-image generators seeded by
(seed, index)) of ``--photos`` radiographs of the split, each made twice: with a lamp's specular
reflection (``glare=True``) and with no reflection at all (``glare=False``). Reported: how often the
"glare" code is given, by the previous check (a blown-out blob ≥ 3 % of the film) and by the
current one (``diagnosis.quality``: that, or a compact saturated peak with a dark surround), and how often any
retake is asked for. ``--choose`` (val only) scans the specular parameters: the largest detection
rate on glare photos with at most ``--max-false`` false glare codes on the digital radiographs and
on the clean photos, and none on the real phone photos.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from diagnosis import quality
from diagnosis.intake import ImageRejected, decode
from diagnosis.photo import rectify

from ..data.synthetic_photos import synthesise_with_corners, to_gray


def views(rows: list[dict], root: Path, photos: int, seed: int) -> dict[str, list[tuple[np.ndarray, object]]]:
    groups: dict[str, list] = {"radiographs": [], "real_phone_photos": [], "synthetic_glare": [],
                               "synthetic_clean": []}
    made = 0
    for index, row in enumerate(rows):
        try:
            gray = decode((root / row["path"]).read_bytes()).gray
        except ImageRejected:
            continue
        phone = row.get("phone_photo") == "1"
        groups["real_phone_photos" if phone else "radiographs"].append((gray, rectify(gray)))
        if not phone and made < photos and index % max(len(rows) // max(photos, 1), 1) == 0:
            made += 1
            for name, glare in (("synthetic_glare", True), ("synthetic_clean", False)):
                photo = to_gray(synthesise_with_corners(gray, np.random.default_rng([seed, index]), glare=glare)[0])
                groups[name].append((photo, rectify(photo)))
    return groups


def rates(group: list, level: int, surround: float, fraction: float) -> dict:
    old = new = any_retake = 0
    for gray, rectified in group:
        raw = quality._raw_film(gray, rectified)
        blown = quality._largest_blown_out_blob(raw) > quality.GLARE_FRACTION
        specular = quality.specular_blob(raw, level, surround) > fraction
        old += blown
        new += blown or specular
        any_retake += bool(quality.check_quality(gray, rectified))
    n = max(len(group), 1)
    return {"n": len(group), "glare_before": round(old / n, 4), "glare_after": round(new / n, 4),
            "any_retake_now": round(any_retake / n, 4)}


def choose(groups: dict, max_false: float) -> dict:
    cached = {name: [quality._raw_film(g, r) for g, r in group] for name, group in groups.items()}
    best = None
    level = quality.SPECULAR_LEVEL
    for surround in (150, 180, 200, 215, 230, 255):
        blobs = {name: np.array([quality.specular_blob(raw, level, surround) for raw in raws])
                 for name, raws in cached.items()}
        for fraction in (0.0005, 0.001, 0.002, 0.003, 0.005, 0.008):
            false = max(float(np.mean(blobs["radiographs"] > fraction)),
                        float(np.mean(blobs["synthetic_clean"] > fraction)))
            real = int(np.sum(blobs["real_phone_photos"] > fraction))
            hit = float(np.mean(blobs["synthetic_glare"] > fraction))
            if false <= max_false and real == 0 and (best is None or hit > best["detection"]):
                best = {"level": level, "surround": surround, "fraction": fraction, "detection": round(hit, 4),
                        "false_radiographs": round(float(np.mean(blobs["radiographs"] > fraction)), 4),
                        "false_clean_photos": round(float(np.mean(blobs["synthetic_clean"] > fraction)), 4)}
    return best or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training measure-glare", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--photos", type=int, default=300, help="radiographs made into synthetic photo pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--choose", action="store_true", help="scan the specular parameters (val only)")
    parser.add_argument("--max-false", type=float, default=0.005)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.choose and args.split != "val":
        parser.error("parameters are chosen on val only")
    manifest = Path(args.manifest)
    with manifest.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == args.split and r["is_xray"] == "1"]
    groups = views(rows, manifest.parent, args.photos, args.seed)
    print({name: len(group) for name, group in groups.items()}, file=sys.stderr)
    report: dict = {"split": args.split, "seed": args.seed,
                    "parameters": {"level": quality.SPECULAR_LEVEL, "surround": quality.SPECULAR_SURROUND,
                                   "fraction": quality.SPECULAR_FRACTION}}
    if args.choose:
        report["chosen"] = choose(groups, args.max_false)
    report["groups"] = {name: rates(group, quality.SPECULAR_LEVEL, quality.SPECULAR_SURROUND,
                                    quality.SPECULAR_FRACTION) for name, group in groups.items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
