"""Do the models cope with phone photos of films, and does the intake step (rectify) help?

    python -m training measure-photos --manifest ../shared/data/xray-pack/manifest.csv --models models \\
        [--json OUT] [--chest-limit N] [--seed 0] [--threads 1] [--chest-split test|val]

1. The pack's real phone photos of films (test split; val too, as test has only five): gate accuracy
   (all are radiographs) and body-part accuracy, on the photo as sent and after ``rectify``.
2. Synthetic phone photos (``training.data.synthetic_photos``, fixed seed) of the chest test split: chest
   mean AUC on the clean radiographs, on the photos, and on the photos after ``rectify``; plus how
   often the gate and body-part models still accept them, how often the film was found (corners
   within 5 % of the frame) and how often the quality check would ask for a retake.
   ``--chest-split val`` does the same on the NIH val films: the split to choose a model on.
3. Digital radiographs of the test split that ``rectify`` changes (it should leave them untouched).

Predictions go through ``diagnosis.network.load_model`` and ``diagnosis.preprocess.to_model_input``,
the one preprocessing path shared with inference.

Measured 2026-11-26 (stop 9) with the models/{gate,body_part,chest} retrained with synthetic photos
(chest: mirror-image averaging on): synthetic photos of 1113 chest test images, seed 0 — chest mean AUC
clean 0.719, photo 0.625, photo after rectify 0.696 (drop 0.023); gate accepts 99.7 % / 76.1 % / 98.1 %;
body part "chest" 98.9 % / 51.0 % / 95.2 %; film found within 5 % in 71.1 %; quality check asks for a
retake for 1.3 %. Real phone photos: test gate 5/5, body part 5/5; val gate 10/11, body part 11/11,
the same with and without rectify (none of them is rectified: their senders cropped them to the
film). Digital test radiographs changed by rectify: 19 / 1506. (Before the retraining: 0.663 / 0.552
/ 0.608, gate 98.4 / 56.2 / 95.4 %.)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diagnosis.cards import discover
from diagnosis.config import models_dir_from_environment
from diagnosis.intake import decode
from diagnosis.network import load_model
from diagnosis.photo import rectify
from diagnosis.preprocess import to_model_input
from diagnosis.quality import check_quality

from ..data.datasets import CHEST_LABELS
from ..data.synthetic_photos import synthesise_with_corners, to_gray
from .metrics import auc_report


class Model:
    """A loaded model folder and a batched ``probabilities(list of gray arrays)``."""

    def __init__(self, folder: Path):
        self.card, self.network = load_model(folder, "cpu")

    def probabilities(self, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        spec = self.card.input
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = np.stack([to_model_input(g, spec.size, spec.mean, spec.std)
                                  for g in images[start:start + batch_size]])
                logits = self.network(torch.from_numpy(batch)).float()
                probs = torch.softmax(logits, 1) if self.card.activation == "softmax" else torch.sigmoid(logits)
                outputs.append(probs.numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.card.labels)), np.float32)


def load_models(models_dir: Path) -> dict[str, Model]:
    found: dict[str, Model] = {}
    for folder, card in discover(models_dir).values():
        role = "chest" if card.role == "abnormality" and card.body_part == "chest" else card.role
        if role in ("gate", "body_part", "chest") and role not in found:
            found[role] = Model(folder)
    return found


def gate_accepts(model: Model, images: list[np.ndarray]) -> np.ndarray:
    card = model.card
    probs = model.probabilities(images)[:, card.labels.index(card.positive_label)]
    return probs >= card.threshold(card.positive_label)


def body_part_correct(model: Model, images: list[np.ndarray], truth: list[str]) -> np.ndarray:
    probs = model.probabilities(images)
    confident = probs.max(axis=1) >= (model.card.min_confidence or 0.0)
    named = np.array([model.card.labels[i] for i in probs.argmax(axis=1)])
    return confident & (named == np.array(truth))


def rate(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def real_photos(rows: list[dict], root: Path, models: dict[str, Model]) -> dict:
    report: dict = {}
    for split in ("test", "val"):
        chosen = [r for r in rows if r["split"] == split and r.get("phone_photo") == "1" and r["is_xray"] == "1"]
        grays = [decode((root / r["path"]).read_bytes()).gray for r in chosen]
        results = [rectify(g) for g in grays]
        views = {"as_sent": grays, "rectified": [r.gray for r in results]}
        entry: dict = {"images": len(chosen), "rectified_by_intake": int(sum(r.rectified for r in results)),
                       "quality_refused": int(sum(bool(check_quality(g, r)) for g, r in zip(grays, results,
                                                                                            strict=True)))}
        for name, images in views.items():
            if "gate" in models and images:
                entry[f"gate_accuracy_{name}"] = rate(gate_accepts(models["gate"], images))
            if "body_part" in models and images:
                entry[f"body_part_accuracy_{name}"] = rate(
                    body_part_correct(models["body_part"], images, [r["body_part"] for r in chosen]))
        report[split] = entry
    return report


def digital_untouched(rows: list[dict], root: Path) -> dict:
    """How many digital radiographs (not phone photos) of the test split does rectify change?"""
    chosen = [r for r in rows if r["split"] == "test" and r["is_xray"] == "1" and r.get("phone_photo") != "1"]
    changed: dict[str, int] = {}
    for row in chosen:
        if rectify(decode((root / row["path"]).read_bytes()).gray).rectified:
            changed[row["body_part"]] = changed.get(row["body_part"], 0) + 1
    return {"images": len(chosen), "changed": sum(changed.values()), "changed_by_body_part": changed}


def synthetic_chest(rows: list[dict], root: Path, models: dict[str, Model], limit: int | None, seed: int,
                    progress: Callable[[str], None], split: str = "test") -> dict:
    chosen = [r for r in rows if r["split"] == split and r["body_part"] == "chest" and r.get("phone_photo") != "1"]
    chosen = chosen[:limit] if limit else chosen
    rng = np.random.default_rng(seed)
    clean, photos, straightened = [], [], []
    found = refused = 0
    for index, row in enumerate(chosen):
        gray = decode((root / row["path"]).read_bytes()).gray
        photo, truth = synthesise_with_corners(gray, rng)
        photo = to_gray(photo)  # as diagnosis.intake converts a colour photo
        result = rectify(photo)
        clean.append(gray)
        photos.append(photo)
        straightened.append(result.gray)
        found += bool(result.rectified and np.abs(result.corners - truth).max() <= 0.05 * max(photo.shape))
        refused += bool(check_quality(photo, result))
        if index % 100 == 99:
            progress(f"  synthesised {index + 1} / {len(chosen)}")
    report: dict = {"split": split, "images": len(chosen), "seed": seed,
                    "film_found_within_5_percent": round(found / max(len(chosen), 1), 4),
                    "quality_refused": round(refused / max(len(chosen), 1), 4)}
    views = {"clean": clean, "synthetic": photos, "synthetic_rectified": straightened}
    if "chest" in models:
        card = models["chest"].card
        columns = [CHEST_LABELS.index(label) for label in card.labels]
        truth = np.array([[int(r[CHEST_LABELS[c]]) for c in columns] for r in chosen], dtype=np.float32)
        for name, images in views.items():
            progress(f"  chest model on {name}")
            aucs = auc_report(card.labels, truth, models["chest"].probabilities(images))
            report[f"chest_mean_auc_{name}"] = round(aucs["mean_auc"], 4) if aucs["mean_auc"] is not None else None
            report[f"chest_auc_{name}"] = {k: round(v, 4) for k, v in aucs["auc"].items()}
    for name, images in views.items():
        if "gate" in models:
            report[f"gate_accepts_{name}"] = rate(gate_accepts(models["gate"], images))
        if "body_part" in models:
            report[f"body_part_chest_{name}"] = rate(body_part_correct(models["body_part"], images,
                                                                       ["chest"] * len(images)))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training measure-photos", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--models", default=models_dir_from_environment(),
                        help="default: $MODELS_DIR, else the repo's models/")
    parser.add_argument("--json", default=None)
    parser.add_argument("--chest-limit", type=int, default=None,
                        help="at most N chest images of --chest-split (default all)")
    parser.add_argument("--chest-split", choices=["test", "val"], default="test",
                        help="split of the synthetic chest photos (val: for choosing between models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep low beside training jobs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    manifest = Path(args.manifest)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    models = load_models(Path(args.models))
    print(f"models: {sorted(models)} ({', '.join(f'{k}={m.card.version}' for k, m in models.items())})",
          file=sys.stderr)

    def progress(message: str) -> None:
        print(message, file=sys.stderr)

    report = {"models": {role: {"name": m.card.name, "version": m.card.version} for role, m in models.items()},
              "real_phone_photos": real_photos(rows, manifest.parent, models),
              "digital_radiographs": digital_untouched(rows, manifest.parent),
              "synthetic_chest_photos": synthetic_chest(rows, manifest.parent, models, args.chest_limit, args.seed,
                                                        progress, args.chest_split)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
