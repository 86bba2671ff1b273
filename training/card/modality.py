"""Modality head on the gate: name CT, MRI or ultrasound (or "not medical") when refusing an image.

    python -m training modality --model models/gate --manifest ../shared/data/xray-pack/manifest.csv \\
        [--cache DIR] [--json OUT] [--dry-run]

A multinomial logistic regression (scikit-learn, balanced class weights, standardised features) on the
gate network's pooled 1024-d features, seen as the service sees the image
(``training.features``); classes from the manifest's ``kind``: radiographs and phone
photos of films → xray; ct, mri, ultrasound; dermoscopy and fundus photos → other_medical; faces,
receipts, clothing and natural photos → non_medical. Fitted on train (X-rays capped per body part),
the regularisation C chosen by balanced accuracy on val, reported on test: the confusion of the head
alone and of what a user is told (the gate decides X-ray or not; the head names the refused images,
``diagnosis.openset.ModalityHead``). Writes ``modality.safetensors`` (weight, bias and the features'
standardisation mean and scale) beside the gate weights and the card's ``modality`` entry.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.preprocessing import StandardScaler

from diagnosis.cards import AuxiliaryFile, ModalitySpec, read_card, write_card
from diagnosis.openset import decide

from ..data.datasets import Record
from ..features import FeatureStore, drop_refused
from ..measure.reports import emit_report
from . import write_arrays

log = logging.getLogger(__name__)
ARRAYS_FILE = "modality.safetensors"
CLASSES = ["xray", "ct", "mri", "ultrasound", "other_medical", "non_medical"]
KIND_TO_CLASS = {
    "radiograph": "xray", "radiograph_with_drawn_boxes": "xray", "phone_photo_of_film": "xray",
    "ct": "ct", "mri": "mri", "ultrasound": "ultrasound", "dermoscopy": "other_medical",
    "fundus_photo": "other_medical", "face_photo": "non_medical", "receipt_scan": "non_medical",
    "natural_photo": "non_medical", "clothing_photo": "non_medical",
}  # fmt: skip


def modality_of(record: Record) -> str | None:
    return KIND_TO_CLASS.get(record.kind)


def choose_records(records: list[Record], max_train_xray_per_part: int) -> list[Record]:
    chosen, per_part = [], defaultdict(int)
    for record in sorted(records, key=lambda r: hashlib.sha256(r.path.name.encode()).hexdigest()):
        if modality_of(record) is None or record.synthetic:
            continue
        if record.split == "train" and record.is_xray:
            per_part[record.body_part] += 1
            if per_part[record.body_part] > max_train_xray_per_part:
                continue
        chosen.append(record)
    return chosen


def confusion(truth: list[str], said: list[str], classes: list[str]) -> dict:
    matrix = confusion_matrix(truth, said, labels=classes)
    return {"labels": classes, "matrix": matrix.tolist(),
            "recall": {c: round(float(matrix[i, i] / max(matrix[i].sum(), 1)), 4) for i, c in enumerate(classes)}}


def run(model: Path, records: list[Record], cache: Path, max_train_xray_per_part: int, write: bool = True,
        max_medical_unfootered: float = 0.01) -> dict:
    card = read_card(model)
    chosen = choose_records(records, max_train_xray_per_part)
    logits, pooled = FeatureStore(model, cache).outputs([r.path for r in chosen])
    chosen, (logits, pooled), refused = drop_refused(chosen, logits, pooled)  # never reach the gate
    truth = np.array([modality_of(r) for r in chosen])
    splits = np.array([r.split for r in chosen])
    y = np.array([CLASSES.index(t) for t in truth])
    train, val, test = splits == "train", splits == "val", splits == "test"
    scaler = StandardScaler().fit(pooled[train])
    x = scaler.transform(pooled)
    searched = {}
    for c in (0.01, 0.1, 1.0):
        fitted = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x[train], y[train])
        searched[c] = (balanced_accuracy_score(y[val], fitted.predict(x[val])), fitted)
        log.info("C=%g val balanced accuracy %.4f", c, searched[c][0])
    best_c = max(searched, key=lambda c: searched[c][0])
    head = searched[best_c][1]
    weight, bias = head.coef_, head.intercept_

    gate_probs = softmax(logits[:, : len(card.labels)].astype(np.float64), axis=1)
    accepted = gate_probs[:, card.labels.index(card.positive_label)] >= card.threshold(card.positive_label)
    raw = ((pooled.astype(np.float32) - scaler.mean_.astype(np.float32)) / scaler.scale_.astype(np.float32)
           ) @ weight.astype(np.float32).T + bias.astype(np.float32)  # as shipped (float32 arrays)
    head_said = np.array([CLASSES[i] for i in raw.argmax(axis=1)])
    # The "non_medical" floor: the lowest probability at which at most --max-medical-unfootered of the
    # val medical images the gate refuses (X-rays included) would be told "not medical".
    medical_refused = val & ~accepted & (truth != "non_medical")
    floor = 0.5
    for candidate in np.round(np.arange(0.5, 1.0, 0.01), 2):
        told_val = decide(raw[medical_refused], accepted[medical_refused], CLASSES, candidate)
        wrong = sum(i == CLASSES.index("non_medical") for i in told_val)
        floor = float(candidate)
        if wrong <= max_medical_unfootered * max(int(medical_refused.sum()), 1):
            break
    told = np.array([CLASSES[i] if i is not None else "not_named"
                     for i in decide(raw, accepted, CLASSES, floor)])
    named_classes = [*CLASSES, "not_named"]

    def figures(mask: np.ndarray) -> dict:
        refused = mask & ~accepted
        return {"n": int(mask.sum()),
                "head_balanced_accuracy": round(float(balanced_accuracy_score(truth[mask], head_said[mask])), 4),
                "head_confusion": confusion(list(truth[mask]), list(head_said[mask]), CLASSES),
                "told_confusion": confusion(list(truth[mask]), list(told[mask]), named_classes),
                "refused_by_gate": int(refused.sum()),
                "refused_named_right": round(float(np.mean(told[refused] == truth[refused])), 4) if refused.any()
                else None,
                "medical_refused_told_non_medical": int(np.sum(refused & (truth != "non_medical")
                                                               & (told == "non_medical"))),
                "non_medical_not_named_keeps_footer": int(np.sum(refused & (truth == "non_medical")
                                                                 & (told == "not_named"))),
                "non_medical_told_medical": int(np.sum(refused & (truth == "non_medical")
                                                       & (told != "non_medical")))}

    metrics = {"data": "pack manifest: fit on train, C on val, reported on val and test",
               "refused_by_intake": refused,
               "train_counts": {c: int(np.sum(train & (truth == c))) for c in CLASSES},
               "c_search_val_balanced_accuracy": {str(c): round(v[0], 4) for c, v in searched.items()},
               "val": figures(val), "test": figures(test)}
    spec = ModalitySpec(
        classes=CLASSES, arrays=AuxiliaryFile(file=ARRAYS_FILE, sha256=""), metrics=metrics,
        non_medical_min_probability=floor,
        method_notes=(f"multinomial logistic regression (balanced class weights, standardised features: "
                      f"mean and scale shipped beside the weights, C={best_c} chosen by val balanced accuracy) on "
                      f"the gate's pooled "
                      f"features; non_medical floor {floor} keeps at most {max_medical_unfootered:.0%} of the val "
                      f"medical images the gate refuses from being told 'not medical'; "
                      f"{int(train.sum())} train images; command: python -m training modality --model "
                      "models/gate --manifest ../shared/data/xray-pack/manifest.csv"))
    if write:
        spec.arrays = write_arrays(model, ARRAYS_FILE, {"weight": weight, "bias": bias, "mean": scaler.mean_,
                                                        "scale": scaler.scale_})
        card.modality = spec
        write_card(model, card)
    return spec.model_dump(mode="json")


def main(args) -> int:
    from ..data.datasets import load_sources

    result = run(args.model, load_sources(args.manifest), args.cache, args.max_train_xray_per_part,
                 write=not args.dry_run)
    return emit_report(result, args.json)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "modality",
                        help="forward-pass cache (not the repository)")
    parser.add_argument("--max-train-xray-per-part", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="measure only; leave the card alone")
