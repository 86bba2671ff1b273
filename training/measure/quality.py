"""How often does the quality check refuse real radiographs, and does it refuse bad shots?

    python -m training measure-quality --manifest ../shared/data/xray-pack/manifest.csv --split test \\
        [--json OUT] [--degraded 300] [--seed 0] [--cost 40] [--dark 60]

Real radiographs: every ``is_xray=1`` row of the split, phone photos of films included, decoded by
``diagnosis.intake`` and rectified by ``diagnosis.photo`` exactly as in the pipeline. The share the
check refuses is the false-refusal rate (target ≤ 2 %). Degraded copies of up to ``--degraded`` of
them (very dark, washed out, blurred, a lamp's glare, a tiny film in a large photo) must be refused
with the matching code. Metric quantiles are printed so thresholds can be picked on val and then
checked once on test.

``--dark PER_PART``: are dark digital files misread because they are dark, or only until windowed?
Dark copies (``degrade(..., "too_dark")``, sent as JPEG files) of PER_PART films per known part and of
``--dark-chest`` labelled NIH chest films go through the service's pipeline beside the films themselves:
per part and per the gray levels the dark copy keeps, the share named right, and the chest mean AUC
over the chest films both copies reach the chest model with.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from diagnosis.intake import ImageRejected, decode
from diagnosis.photo import models_view, rectify
from diagnosis.quality import CODES, check_quality, quality_metrics

from ..data.synthetic_photos import synthesise_with_corners, to_gray

INPUT_SIDE = 128  # the shipped models' input side (card input.size): "too few pixels" only below it
DEGRADATIONS = ("too_dark", "too_bright", "blurred", "glare", "film_too_small")


def degrade(gray: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A deliberately bad version of a good radiograph, named by the code it should earn."""
    image = gray.astype(np.float32)
    height, width = gray.shape
    if kind == "too_dark":  # a film photographed without the light box switched on
        image = image * rng.uniform(0.05, 0.15)
    elif kind == "too_bright":  # overexposed: everything washed towards white
        image = 255 - (255 - image) * rng.uniform(0.08, 0.2)
    elif kind == "blurred":  # out of focus, strongly: detail of ~2–3 % of the film is gone
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.02, 0.03) * max(height, width))
    elif kind == "glare":  # a lamp's reflection: a blown-out spot with a soft halo
        sigma = rng.uniform(0.08, 0.14) * min(height, width)
        cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        image = image + 400 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    elif kind == "film_too_small":  # the film is a small part of a photo of the room
        scene = ("lightbox", "printout")[int(rng.integers(2))]
        return to_gray(synthesise_with_corners(gray, rng, scene=scene, fraction=(0.06, 0.10))[0])
    else:
        raise ValueError(kind)
    return np.clip(image, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training measure-quality", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--degraded", type=int, default=300, help="degraded copies per kind (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dark", type=int, default=0, metavar="PER_PART",
                        help="also read dark copies of PER_PART films per part as files (windowed or refused)")
    parser.add_argument("--dark-chest", type=int, default=300, help="labelled NIH chest films for --dark's AUC")
    parser.add_argument("--cost", type=int, default=0, metavar="PER_PART",
                        help="also read the split with the check off (files, real photos, synthetic photos and "
                             "degraded copies of PER_PART films per part): share named right per rule")
    args = parser.parse_args(argv)

    manifest = Path(args.manifest)
    with manifest.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == args.split and r["is_xray"] == "1"]
    refused, codes, by_group, metrics, examples = 0, Counter(), Counter(), [], []
    rectified_count = 0
    grays = []
    for row in rows:
        try:
            decoded = decode((manifest.parent / row["path"]).read_bytes())
        except ImageRejected as error:
            print(f"skipped {row['path']}: {error.code}", file=sys.stderr)
            continue
        gray = decoded.gray
        result = models_view(decoded)  # as the service sees the file (diagnosis.pipeline)
        rectified_count += result.rectified
        problems = check_quality(gray, result, result.photographed, INPUT_SIDE)
        metrics.append(quality_metrics(gray, result))
        grays.append(gray)
        if problems:
            refused += 1
            codes.update(problems)
            group = f"{row['body_part']}{' (phone photo)' if row.get('phone_photo') == '1' else ''}"
            by_group[group] += 1
            examples.append({"path": row["path"], "problems": problems})
    total = len(grays)
    report: dict = {
        "split": args.split,
        "real_radiographs": total,
        "rectified": rectified_count,
        "wrongly_refused": refused,
        "wrongly_refused_rate": round(refused / max(total, 1), 4),
        "wrongly_refused_by_code": {code: codes[code] for code in CODES if codes[code]},
        "wrongly_refused_by_body_part": dict(by_group),
        "wrongly_refused_examples": examples[:20],
        "real_metric_quantiles": _quantiles(metrics),
    }

    rng = np.random.default_rng(args.seed)
    picks = rng.permutation(total)[: args.degraded] if args.degraded else []
    degraded: dict = {}
    for kind in DEGRADATIONS if args.degraded else ():
        hit, any_refusal, kind_metrics = 0, 0, []
        for index in picks:
            bad = degrade(grays[index], kind, rng)
            result = rectify(bad)
            problems = check_quality(bad, result, True, INPUT_SIDE)  # a bad shot: judged as a photo
            kind_metrics.append(quality_metrics(bad, result))
            hit += kind in problems
            any_refusal += bool(problems)
        degraded[kind] = {"images": len(picks), "refused_with_this_code": hit,
                          "refused_with_this_code_rate": round(hit / max(len(picks), 1), 4),
                          "refused_at_all": any_refusal, "metric_quantiles": _quantiles(kind_metrics)}
    report["degraded"] = degraded

    print(f"split {args.split}: real radiographs wrongly refused {refused} / {total} "
          f"({100 * refused / max(total, 1):.2f} %); rectified {rectified_count}")
    print(f"  by code: {report['wrongly_refused_by_code']}  by body part: {dict(by_group)}")
    for kind, figures in degraded.items():
        print(f"  degraded {kind:15s} refused with that code {figures['refused_with_this_code']} / "
              f"{figures['images']} ({100 * figures['refused_with_this_code_rate']:.1f} %), "
              f"refused at all {figures['refused_at_all']}")
    print("  real radiographs, metric quantiles (0.1 %, 1 %, 50 %, 99 %, 99.9 %):")
    for name, values in report["real_metric_quantiles"].items():
        print(f"    {name:14s} {values}")
    if args.cost:
        report["cost"] = rule_cost(manifest, args.split, args.cost)
        print("  with the check off, share named right per rule (kind, code: n, named right):")
        for key, figures in report["cost"].items():
            print(f"    {key:40s} {figures['n']:5d} {figures['named_right']:.3f}")
    if args.dark:
        report["dark"] = dark_files(manifest, args.split, args.dark, args.dark_chest, args.seed)
        print("  dark copies of films sent as files, with the service's rules (n, named right, outcomes):")
        for key, figures in report["dark"]["groups"].items():
            print(f"    {key:34s} {figures['n']:5d} {figures['named_right']:.3f}  {figures['outcomes']}")
        for key, figures in report["dark"]["chest_auc"].items():
            print(f"    chest mean AUC, {key:18s} {figures}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def rule_cost(manifest: Path, split: str, per_part: int, seed: int = 0) -> dict:
    """Does each rule refuse pictures the models would misread? The shipped pipeline with the
    quality check off (``Pipeline.refuse_bad_shots``) reads the split's radiographs of the known
    parts as sent, synthetic photos (``synthetic_photos``, seed (seed, i)) of ``per_part`` films per
    part and degraded copies of them (``degrade``, sent as JPEG); per (kind, code) and for the clean
    pictures of each kind: how many, and the share whose reply named the right part. Every rule is
    applied to every picture here (files judged as photos too), so the table says for each kind of
    picture whether a rule's refusals are pictures the models would misread."""
    import hashlib
    from collections import defaultdict

    from diagnosis.pipeline import Pipeline

    from ..data.datasets import load_sources
    from .routing import as_jpeg

    pipeline = Pipeline.load(backend="onnx", threads=1)
    pipeline.refuse_bad_shots = False
    input_side = pipeline.input_side
    labels = pipeline.body_part.card.labels
    records = sorted((r for r in load_sources([str(manifest)]) if r.split == split and r.is_xray
                      and not r.synthetic and r.body_part in labels),
                     key=lambda r: hashlib.sha256(r.path.name.encode()).hexdigest())
    jobs: list[tuple[str, object, int | None]] = [("real_photo" if r.phone_photo else "file", r, None)
                                                   for r in records]
    taken: Counter = Counter()
    films = []
    for record in (r for r in records if not r.phone_photo):
        if taken[record.body_part] < per_part:
            taken[record.body_part] += 1
            films.append(record)
    for index, record in enumerate(films):
        jobs += [(kind, record, index) for kind in ("synthetic_photo", *(f"degraded:{k}" for k in DEGRADATIONS[:4]))]

    def picture(kind: str, record, index: int | None) -> bytes:
        data = record.path.read_bytes()
        if index is None:
            return data
        gray = decode(data).gray
        rng = np.random.default_rng((seed, index))
        if kind == "synthetic_photo":
            return as_jpeg(to_gray(synthesise_with_corners(gray, rng)[0]))
        return as_jpeg(degrade(gray, kind.split(":")[1], rng))

    counts: dict[str, Counter] = defaultdict(Counter)
    for start in range(0, len(jobs), 16):
        chunk = jobs[start:start + 16]
        datas = [picture(*job) for job in chunk]
        for (kind, record, _), data, analysis in zip(chunk, datas, pipeline.run_batch(datas, make_overlay=False),
                                                     strict=True):
            result = analysis.result
            if result.input_format is None:
                continue
            # Every rule on every picture (as if each were a photo), so that a rule's cost shows for each
            # kind of picture, files included, whichever kinds the service asks it of.
            decoded = decode(data)
            codes = check_quality(decoded.gray, models_view(decoded), True, input_side) \
                if decoded.format != "DICOM" else []
            right = result.outcome in ("analysed", "body_part_not_analysed") and result.body_part == record.body_part
            for key in [f"{kind}: {code}" for code in codes] or [f"{kind}: clean"]:
                counts[key]["n"] += 1
                counts[key]["right"] += right
    return {key: {"n": c["n"], "named_right": round(c["right"] / c["n"], 4)} for key, c in sorted(counts.items())}


def dark_files(manifest: Path, split: str, per_part: int, chest_films: int, seed: int = 0) -> dict:
    """The films themselves and dark copies of them (``degrade(..., "too_dark")``, JPEG files) through
    the service's pipeline, quality check on: per part, and per whether the dark copy kept enough gray
    levels to be windowed (``photo.brighten_if_dark``), how many and the share named right; the chest
    mean AUC over the labelled chest films both copies reached the chest model with."""
    import hashlib
    from collections import defaultdict

    from diagnosis.pipeline import Pipeline

    from ..data.datasets import CHEST_LABELS, load_sources
    from .metrics import auc_report
    from .routing import as_jpeg

    pipeline = Pipeline.load(backend="onnx", threads=1)
    labels = pipeline.body_part.card.labels
    records = sorted((r for r in load_sources([str(manifest)]) if r.split == split and r.is_xray
                      and not r.synthetic and not r.phone_photo and r.body_part in labels),
                     key=lambda r: hashlib.sha256(r.path.name.encode()).hexdigest())
    labelled = [r for r in records if r.body_part == "chest" and r.chest_labels is not None
                and None not in r.chest_labels][:chest_films]
    taken: Counter = Counter()
    films = list(labelled)
    for record in records:
        if record.body_part != "chest" and taken[record.body_part] < per_part:
            taken[record.body_part] += 1
            films.append(record)
    counts: dict[str, Counter] = defaultdict(Counter)
    outcomes: dict[str, Counter] = defaultdict(Counter)
    chest: dict[str, dict] = {"film": {}, "dark": {}}
    for start in range(0, len(films), 8):
        chunk = films[start:start + 8]
        pictures = []
        for index, record in enumerate(chunk, start):
            data = record.path.read_bytes()
            dark = as_jpeg(degrade(decode(data).gray, "too_dark", np.random.default_rng((seed, index))))
            kind = "dark, windowed" if models_view(decode(dark)).brightened else "dark, too few levels"
            pictures += [(record, "film", data), (record, kind, dark)]
        analyses = pipeline.run_batch([p[2] for p in pictures], make_overlay=False)
        for (record, kind, _), analysis in zip(pictures, analyses, strict=True):
            result = analysis.result
            right = result.outcome in ("analysed", "body_part_not_analysed") and result.body_part == record.body_part
            for key in (kind, f"{kind}: {record.body_part}"):
                counts[key]["n"] += 1
                counts[key]["right"] += right
                outcomes[key][result.outcome] += 1
            if record in labelled and result.findings:
                chest[kind.split(",")[0]][record.path.name] = (record.chest_labels,
                                                                {f.label: f.probability for f in result.findings})
    both = sorted(set(chest["film"]) & set(chest["dark"]))
    aucs = {}
    for kind in ("film", "dark"):
        if len(both) > 10:
            truth = np.asarray([chest[kind][name][0] for name in both], dtype=float)
            probs = np.asarray([[chest[kind][name][1].get(label, np.nan) for label in CHEST_LABELS] for name in both])
            aucs[kind] = {"films": len(both), "mean_auc": auc_report(list(CHEST_LABELS), truth, probs).get("mean_auc")}
    return {"per_part": per_part, "chest_films": len(labelled),
            "groups": {key: {"n": c["n"], "named_right": round(c["right"] / c["n"], 4), "outcomes": dict(outcomes[key])}
                       for key, c in sorted(counts.items())},
            "chest_auc": aucs}


def _quantiles(metrics: list[dict[str, float]]) -> dict[str, list[float]]:
    if not metrics:
        return {}
    return {name: [round(float(np.quantile([m[name] for m in metrics], q)), 4)
                   for q in (0.001, 0.01, 0.5, 0.99, 0.999)] for name in metrics[0]}
