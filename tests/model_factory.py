"""Tiny random-weight model folders whose classifier biases force an outcome (fast, deterministic).

Real cards, real safetensors, real DenseNet-121s — only the weights are untrained. Use them where a
test needs a particular route through the pipeline; use the shipped models/ to test real behaviour.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diagnosis.cards import (
    InputSpec,
    LabelPoint,
    ModelCard,
    OperatingPoints,
    PointFigures,
    VerdictPoint,
    WeightsSpec,
    write_card,
)
from diagnosis.network import DenseNetClassifier, save_weights

CHEST_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]  # fmt: skip
PARTS = ["chest", "hand", "knee"]


def make_model(folder: Path, *, role: str, labels: list[str], activation: str, biases: list[float],
               size: int = 64, seed: int = 0, **card_fields) -> ModelCard:
    torch.manual_seed(seed)
    network = DenseNetClassifier(len(labels) + len(card_fields.get("extra_outputs", []))).eval()
    with torch.no_grad():
        network.classifier.weight.mul_(0.1)  # keep CAMs non-trivial but let the bias decide
        network.classifier.bias.copy_(torch.tensor(biases, dtype=torch.float32))
    sha, dtype = save_weights(network, folder, dtype=torch.float32)
    card = ModelCard(name=folder.name, version="test", role=role, labels=labels, activation=activation,
                     input=InputSpec(size=size), weights=WeightsSpec(sha256=sha, dtype=dtype), **card_fields)
    write_card(folder, card)
    return card


def stand_in_points(labels: list[str], threshold: float = 0.5) -> OperatingPoints:
    """Operating points of the shape ``python -m training calibrate`` writes, with made-up figures:
    every label eligible at ``threshold`` in both modes, a verdict on a score of the labels."""
    figures = PointFigures(n=100, positives=10, prevalence=0.1, sensitivity=0.6, specificity=0.95, ppv=0.57, auc=0.85)

    def point() -> LabelPoint:
        return LabelPoint(eligible=True, threshold=threshold, val=figures, test=figures)

    verdict = VerdictPoint(output="findings_score", threshold=0.5, weights=[1.0] * len(labels), bias=0.0,
                           val=figures, test=figures)
    return OperatingPoints(screening={label: point() for label in labels},
                           clinician={label: point() for label in labels}, verdict=verdict)


def make_models_dir(root: Path, *, xray: bool = True, body_part: str = "chest", positives: tuple[str, ...] = (
        "Effusion", "Cardiomegaly"), body_part_confidence: float = 8.0, size: int = 64,
        operating_points: bool = True) -> Path:
    """gate + body_part (chest/hand/knee) + chest models under ``root``; returns ``root``.

    ``operating_points=False`` gives a chest card as written before calibration (no points)."""
    root = Path(root)
    make_model(root / "gate", role="gate", labels=["not_xray", "xray"], activation="softmax",
               biases=[-8.0, 8.0] if xray else [8.0, -8.0], positive_label="xray",
               thresholds={"xray": 0.5}, size=size)
    make_model(root / "body_part", role="body_part", labels=PARTS, activation="softmax",
               biases=[body_part_confidence if p == body_part else 0.0 for p in PARTS],
               min_confidence=0.5, size=size)
    chest_biases = [3.0 - i * 0.5 if label in positives else -4.0 - i * 0.1
                    for i, label in enumerate(CHEST_LABELS)]
    make_model(root / "chest", role="abnormality", body_part="chest", labels=CHEST_LABELS,
               activation="sigmoid", biases=chest_biases, thresholds=dict.fromkeys(CHEST_LABELS, 0.5), size=size,
               operating_points=stand_in_points(CHEST_LABELS) if operating_points else None)
    return root
