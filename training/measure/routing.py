"""`python -m training measure-routing`: what the reply names, measured as users see it.

Every image of one split goes through the real ``Pipeline`` (intake, photo step, orientation, gate,
body part with its unknown-part check, chest model) as a JPEG a user would send, and the outcome is
counted per group:

- ``film:<part>``: digital radiographs of a part the service knows; right = the reply names that part;
- ``real_photo:<part>``: the pack's real phone photos of films;
- ``synthetic_photo:<part>``: phone photos made from the films (``training synthetic-photos`` scenes;
  ``--sent-photos``: as sent through a messenger, cropped by the sender and re-compressed);
- ``unknown:<part>``: radiographs of parts the body-part model was never trained on (hip, wrist …):
  right = not named as any known part; ``called_chest`` counts the worst mistake;
- ``not_xray:<kind>``: everything else; right = refused as not an X-ray (or refused by intake).

``--angles 0,90,180,270,15,-15`` turns each image by those angles first (counter-clockwise, as a
phone held sideways; a tilt leaves black corners as a film photographed askew), so the same table
says how the reply copes with films sent sideways, upside down or askew. For NIH chest films with
their 14 labels the chest mean AUC over the films analysed as chest is reported per angle.

Choose on ``--split val``; ``--split test`` only reports.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from diagnosis.config import PipelineConfig, models_dir_from_environment
from diagnosis.intake import ImageRejected, decode

from ..data.datasets import Record


def turn(gray: np.ndarray, angle: int) -> np.ndarray:
    """The film turned counter-clockwise by ``angle`` degrees; a tilt (not a multiple of 90) keeps
    the whole film and fills the corners with black, as a film photographed askew on a dark desk."""
    if angle % 90 == 0:
        return np.ascontiguousarray(np.rot90(gray, (angle // 90) % 4))
    height, width = gray.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(height * sin + width * cos), int(height * cos + width * sin)
    matrix[0, 2] += new_w / 2 - width / 2
    matrix[1, 2] += new_h / 2 - height / 2
    return cv2.warpAffine(gray, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderValue=0)


def as_jpeg(gray: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _group(record: Record) -> str | None:
    if not record.is_xray:
        return f"not_xray:{record.kind}"
    if record.phone_photo:
        return f"real_photo:{record.body_part}"
    if record.body_part in KNOWN_PARTS:
        return f"film:{record.body_part}"
    return f"unknown:{record.body_part}"


KNOWN_PARTS: tuple[str, ...] = ()  # set from the body-part card in measure()


def choose(records: list[Record], split: str, per_group: int | None) -> list[tuple[str, Record]]:
    """The split's images by group, at most ``per_group`` of each (a fixed, name-ordered sample)."""
    counts: Counter = Counter()
    chosen = []
    for record in sorted(records, key=lambda r: hashlib.sha256(r.path.name.encode()).hexdigest()):
        if record.split != split or record.synthetic:
            continue
        group = _group(record)
        if group is None or (per_group is not None and counts[group] >= per_group):
            continue
        counts[group] += 1
        chosen.append((group, record))
    return chosen


def _verdict(group: str, part: str, result) -> str:
    """How the reply went for one image, from the user's side."""
    kind, truth = group.split(":", 1)
    named = result.body_part if result.outcome in ("analysed", "body_part_not_analysed") else None
    if kind == "not_xray":
        return "refused" if result.outcome in ("not_xray", "rejected") else f"accepted:{named or result.outcome}"
    if named is not None:
        if kind == "unknown":
            return "called_chest" if named == "chest" else "named_wrong"
        return "named_right" if named == truth else "named_wrong"
    if kind == "unknown" and result.outcome in ("body_part_unknown", "body_part_uncertain"):
        return "refused_right"
    return result.outcome


def measure(records: list[Record], split: str = "val", angles: tuple[int, ...] = (0,), models: Path | None = None,
            per_group: int | None = None, synthetic_per_part: int = 0, seed: int = 0, batch: int = 16,
            sent_photos: bool = False,
            backend: str = "onnx", threads: int | None = None, progress=print, misses: bool = False) -> dict:
    from diagnosis.pipeline import Pipeline

    from ..data.datasets import CHEST_LABELS
    from ..data.synthetic_photos import synthesise_with_corners, to_gray
    from .metrics import auc_report

    global KNOWN_PARTS
    pipeline = Pipeline.load(PipelineConfig(models_dir=models or models_dir_from_environment(), backend=backend,
                                            threads=threads))
    KNOWN_PARTS = tuple(pipeline.body_part.card.labels)
    chosen = choose(records, split, per_group)
    jobs: list[tuple[str, Record, int | None]] = [(g, r, None) for g, r in chosen]
    if synthetic_per_part:
        films = [(g, r) for g, r in chosen if g.startswith("film:")]
        taken: Counter = Counter()
        for index, (group, record) in enumerate(films):
            if taken[group] < synthetic_per_part:
                taken[group] += 1
                jobs.append((group.replace("film:", "synthetic_photo:"), record, index))

    def picture(record: Record, synthetic: int | None, angle: int) -> bytes | None:
        data = record.path.read_bytes()
        if synthetic is None and angle == 0:
            return data  # the file exactly as a user would send it
        try:
            gray = decode(data).gray
        except ImageRejected:
            return data
        if synthetic is not None:
            rng = np.random.default_rng((seed, synthetic))
            photo = synthesise_with_corners(gray, rng, sent=sent_photos)[0]
            return as_jpeg(turn(photo if sent_photos else to_gray(photo), angle))  # a messenger's stays in colour
        return as_jpeg(turn(gray, angle))

    table: dict = {}
    started = time.monotonic()
    for angle in angles:
        verdicts: dict[str, Counter] = defaultdict(Counter)
        chest_truth, chest_probs, missed = [], [], []
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            datas = [picture(r, s, angle) for _, r, s in chunk]
            results = pipeline.run_batch(datas, [r.path.name for _, r, _ in chunk], make_overlay=False)
            for (group, record, _), analysis in zip(chunk, results, strict=True):
                result = analysis.result
                verdict = _verdict(group, record.body_part or "", result)
                verdicts[group][verdict] += 1
                if misses and verdict not in ("named_right", "refused", "refused_right"):
                    missed.append(_miss(group, record, verdict, result))
                if result.turned:
                    verdicts[group]["turned"] += 1
                if (group == "film:chest" and record.chest_labels is not None
                        and None not in record.chest_labels):
                    probs = {f.label: f.probability for f in result.findings}
                    chest_truth.append(record.chest_labels)
                    chest_probs.append([probs.get(label, np.nan) for label in CHEST_LABELS])
            progress(f"angle {angle}: {min(start + batch, len(jobs))} / {len(jobs)} images "
                     f"({time.monotonic() - started:.0f} s)")
        table[str(angle)] = _summary(verdicts)
        if misses:
            table[str(angle)]["misses"] = missed
        if chest_truth:
            truth, probs = np.asarray(chest_truth, dtype=float), np.asarray(chest_probs, dtype=float)
            seen = ~np.isnan(probs).any(axis=1)
            aucs = auc_report(list(CHEST_LABELS), truth[seen], probs[seen]) if seen.sum() > 10 else {}
            table[str(angle)]["chest_auc"] = {"films": len(truth), "analysed_as_chest": int(seen.sum()),
                                              "mean_auc": aucs.get("mean_auc")}
    return {"split": split, "angles": list(angles), "per_group": per_group, "synthetic_per_part": synthetic_per_part,
            "sent_photos": sent_photos,
            "seed": seed, "seconds": round(time.monotonic() - started, 1), "by_angle": table}


def _miss(group: str, record: Record, verdict: str, result) -> dict:
    """One image the reply got wrong, with the scores behind it (for choosing rules on val)."""
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(float(value), 3)

    return {"group": group, "file": record.path.name, "verdict": verdict, "outcome": result.outcome,
            "body_part": result.body_part, "body_part_probability": rounded(result.body_part_probability),
            "novelty": rounded(result.body_part_novelty), "xray_probability": rounded(result.xray_probability),
            "modality": result.modality, "retake": list(result.retake), "photographed": result.photographed,
            "rectified": result.rectified, "turned": result.turned}


def _summary(verdicts: dict[str, Counter]) -> dict:
    """Per group: n, the share the reply got right and what happened to the rest; then per kind."""
    groups = {}
    kinds: dict[str, Counter] = defaultdict(Counter)
    for group in sorted(verdicts):
        counts = verdicts[group]
        n = sum(v for k, v in counts.items() if k not in ("turned", "not_turned"))
        right = counts["named_right"] + counts["refused"] + counts["refused_right"]
        groups[group] = {"n": n, "right": round(right / n, 4) if n else None,
                         "outcomes": {k: v for k, v in counts.items() if v and k not in ("turned", "not_turned")},
                         "turned": counts["turned"]}
        kind = group.split(":", 1)[0]
        kinds[kind]["n"] += n
        kinds[kind]["right"] += right
        if kind == "unknown":
            kinds[kind]["called_chest"] += counts["called_chest"]
            kinds[kind]["named_wrong"] += counts["named_wrong"]
    overall = {kind: {"n": c["n"], "right": round(c["right"] / c["n"], 4) if c["n"] else None,
                      **({"called_chest": c["called_chest"], "named_wrong": c["named_wrong"]} if kind == "unknown"
                         else {})}
               for kind, c in kinds.items()}
    return {"overall": overall, "groups": groups}


def print_table(report: dict) -> None:
    print(f"{report['split']} split; right = the reply names the right part (films, photos), refuses a "
          f"non-X-ray, or names no known part for an unknown one")
    angles = report["angles"]
    groups = sorted({g for a in angles for g in report["by_angle"][str(a)]["groups"]})
    print("| group | n | " + " | ".join(f"{a}°" for a in angles) + " |")
    print("|---|---|" + "---|" * len(angles))
    for kind in ("film", "real_photo", "synthetic_photo", "unknown", "not_xray"):
        rows = [(kind, report["by_angle"][str(a)]["overall"].get(kind)) for a in angles]
        if rows[0][1]:
            print(f"| **{kind} (all)** | {rows[0][1]['n']} | "
                  + " | ".join(f"{r['right']:.3f}" if r and r["right"] is not None else "—" for _, r in rows) + " |")
        for group in [g for g in groups if g.startswith(kind + ":")]:
            cells = [report["by_angle"][str(a)]["groups"].get(group) for a in angles]
            n = next((c["n"] for c in cells if c), 0)
            print(f"| {group} | {n} | " + " | ".join(f"{c['right']:.3f}" if c else "—" for c in cells) + " |")
    for a in angles:
        auc = report["by_angle"][str(a)].get("chest_auc")
        if auc:
            mean = auc["mean_auc"]
            print(f"{a}°: chest mean AUC {mean if mean is None else round(mean, 4)} over {auc['analysed_as_chest']} "
                  f"of {auc['films']} labelled NIH films analysed as chest")
    for a in angles:
        misses: Counter = Counter()
        for group, row in report["by_angle"][str(a)]["groups"].items():
            if group.startswith(("film:", "real_photo:", "synthetic_photo:")):
                misses.update({k: v for k, v in row["outcomes"].items() if k != "named_right"})
        print(f"{a}°: misses of known parts by outcome: {dict(misses.most_common())}")
        for miss in report["by_angle"][str(a)].get("misses", []):
            print(f"  {a}° miss: " + " ".join(f"{k}={v}" for k, v in miss.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training measure-routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--angles", default="0", help="comma-separated turns in degrees, e.g. 0,90,180,270,15,-15")
    parser.add_argument("--models", type=Path, help="models folder (default: the repository's models/)")
    parser.add_argument("--per-group", type=int, help="at most this many images per group (a quicker look)")
    parser.add_argument("--synthetic-per-part", type=int, default=20, help="synthetic phone photos per known part")
    parser.add_argument("--sent-photos", action="store_true",
                        help="synthetic photos as sent through a messenger (the sender's crop, a finger, "
                             "re-compression; sent in colour)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["torch", "onnx"], default="onnx")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--misses", action="store_true",
                        help="list every image the reply got wrong, with its scores (novelty, probabilities, retake)")
    args = parser.parse_args(argv)
    from ..data.datasets import load_sources
    from .reports import write_report

    report = measure(load_sources(args.manifest), args.split, tuple(int(a) for a in args.angles.split(",")),
                     args.models, args.per_group, args.synthetic_per_part, args.seed, backend=args.backend,
                     threads=args.threads, progress=lambda m: print(m, file=sys.stderr, flush=True),
                     misses=args.misses, sent_photos=args.sent_photos)
    print_table(report)
    if args.json:
        write_report(report, args.json)
    return 0
