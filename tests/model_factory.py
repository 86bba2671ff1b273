"""Tiny random-weight model folders whose classifier biases force an outcome (fast, deterministic).

Real cards, real safetensors, real DenseNet-121s — only the weights are untrained. Use them where a
test needs a particular route through the pipeline; use the shipped models/ to test real behaviour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from diagnosis.cards import (
    AuxiliaryFile,
    HeatmapSpec,
    InputSpec,
    LabelPoint,
    ModalitySpec,
    ModelCard,
    OpenSetSpec,
    OperatingPoints,
    OrientationSpec,
    PointFigures,
    VerdictPoint,
    WeightsSpec,
    read_card,
    sha256_of,
    write_card,
)
from diagnosis.heatmap import BLOCK3_METHOD
from diagnosis.network import DenseNetClassifier, save_weights
from training.data.datasets import CHEST_LABELS

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


def _arrays(folder: Path, name: str, arrays: dict[str, np.ndarray]) -> AuxiliaryFile:
    save_file({k: v.astype(np.float32) for k, v in arrays.items()}, str(folder / name))
    return AuxiliaryFile(file=name, sha256=sha256_of(folder / name))


def add_open_set(folder: Path, threshold: float, chest_floor: float | None = None,
                 photo_threshold: float | None = None, confident: tuple[float, float] | None = None) -> None:
    """Open-set arrays whose distance is exactly 1 for every image (zero means, identity precision,
    L2-normalised features): a threshold below 1 makes every film "unknown", above 1 none
    (``photo_threshold``: the same for photos the photo step straightened)."""
    card = read_card(folder)
    features = 1024
    spec = _arrays(folder, "open_set.safetensors", {"means": np.zeros((len(card.labels), features)),
                                                    "precision": np.eye(features)})
    card.open_set = OpenSetSpec(arrays=spec, threshold=threshold, photo_threshold=photo_threshold,
                                label_min_confidence={"chest": chest_floor} if chest_floor is not None else {},
                                confident_probability=confident[0] if confident else None,
                                confident_threshold=confident[1] if confident else None)
    write_card(folder, card)


def add_modality(folder: Path, modality: str) -> None:
    """A modality head that names ``modality`` for every image the gate refuses (zero weights, its bias)."""
    card = read_card(folder)
    classes = ["xray", "ct", "mri", "ultrasound", "other_medical", "non_medical"]
    spec = _arrays(folder, "modality.safetensors", {"weight": np.zeros((len(classes), 1024)),
                                                    "bias": np.array([8.0 if c == modality else 0.0 for c in classes])})
    card.modality = ModalitySpec(classes=classes, arrays=spec)
    write_card(folder, card)


def add_orientation(folder: Path, turn: str, min_probability: float = 0.5,
                    min_probability_refused: float | None = None, **spec) -> None:
    """An orientation head that says ``turn`` ("0", "90", "180", "270" or "not_xray") for every image
    with probability ~0.9 (zero weights, its bias; each other class ~0.025); ``spec``: further
    ``OrientationSpec`` fields (turns on trial, the not-X-ray refusal)."""
    card = read_card(folder)
    classes = ["0", "90", "180", "270", "not_xray"]
    side = -(-card.input.size // 32)
    arrays = _arrays(folder, "orientation.safetensors", {
        "weight": np.zeros((len(classes), 1024 * side * side)),
        "bias": np.array([np.log(0.9 / 0.025) if c == turn else 0.0 for c in classes])})
    card.orientation = OrientationSpec(classes=classes, arrays=arrays, min_probability=min_probability,
                                       min_probability_refused=min_probability_refused, **spec)
    write_card(folder, card)


STAND_IN_BLOCK3_SCALE = 1e-3


def add_heatmap_baseline(folder: Path, mean: float | np.ndarray = 0.0, scale: float = 1.0,
                         method: str = "block3") -> None:
    """The card's ``heatmap`` arrays: a normal mean map (a constant, or one array per label) and one
    colour scale for every label. ``method`` "block3" (as the shipped chest card): the block-3
    gradient × activation map (input size / 16 cells a side), with the 4 × 4 map's arrays kept beside
    it (zero mean, scale 1); "final": the final map's ``W_c · A`` (input size / 32)."""
    card = read_card(folder)
    block3 = method == "block3"
    cells = card.input.size // (16 if block3 else 32)
    means = np.broadcast_to(np.asarray(mean, dtype=np.float32), (len(card.labels), cells, cells)).copy()
    arrays = {"mean": means, "scale": np.full(len(card.labels), scale)}
    if block3:
        final = card.input.size // 32
        arrays.update(final_mean=np.zeros((len(card.labels), final, final)), final_scale=np.ones(len(card.labels)))
    spec = _arrays(folder, "heatmap.safetensors", arrays)
    card.heatmap = HeatmapSpec(arrays=spec, method=BLOCK3_METHOD if block3 else "evidence_minus_normal_mean")
    write_card(folder, card)


def make_models_dir(root: Path, *, xray: bool = True, body_part: str = "chest", positives: tuple[str, ...] = (
        "Effusion", "Cardiomegaly"), body_part_confidence: float = 8.0, size: int = 64,
        operating_points: bool = True, open_set_threshold: float | None = None,
        chest_floor: float | None = None, modality: str | None = None,
        open_set_photo_threshold: float | None = None, orientation: str | None = None,
        orientation_min_probability: float = 0.5, orientation_min_probability_refused: float | None = None,
        orientation_spec: dict | None = None, heatmap_baseline: bool = True) -> Path:
    """gate + body_part (chest/hand/knee) + chest models under ``root``; returns ``root``.

    ``operating_points=False`` gives a chest card as written before calibration (no points).
    ``open_set_threshold`` (< 1: every film an unknown part; > 1: none) and ``chest_floor`` add the
    body-part card's open-set check (``open_set_photo_threshold``: its photo threshold); ``modality``
    adds a gate modality head naming that class; ``orientation`` a gate orientation head that says
    that turn for every image (at ~0.9, against ``orientation_min_probability``; ``orientation_spec``: its
    further fields); ``heatmap_baseline``: the chest card's ``heatmap`` arrays (a zero normal mean,
    scale ``STAND_IN_BLOCK3_SCALE``), as the shipped card has them."""
    root = Path(root)
    make_model(root / "gate", role="gate", labels=["not_xray", "xray"], activation="softmax",
               biases=[-8.0, 8.0] if xray else [8.0, -8.0], positive_label="xray",
               thresholds={"xray": 0.5}, size=size)
    if modality:
        add_modality(root / "gate", modality)
    if orientation:
        add_orientation(root / "gate", orientation, orientation_min_probability, orientation_min_probability_refused,
                        **(orientation_spec or {}))
    make_model(root / "body_part", role="body_part", labels=PARTS, activation="softmax",
               biases=[body_part_confidence if p == body_part else 0.0 for p in PARTS],
               min_confidence=0.5, size=size)
    if open_set_threshold is not None or chest_floor is not None:
        add_open_set(root / "body_part", 1e9 if open_set_threshold is None else open_set_threshold, chest_floor,
                     open_set_photo_threshold)
    chest_biases = [3.0 - i * 0.5 if label in positives else -4.0 - i * 0.1
                    for i, label in enumerate(CHEST_LABELS)]
    make_model(root / "chest", role="abnormality", body_part="chest", labels=CHEST_LABELS,
               activation="sigmoid", biases=chest_biases, thresholds=dict.fromkeys(CHEST_LABELS, 0.5), size=size,
               operating_points=stand_in_points(CHEST_LABELS) if operating_points else None)
    if heatmap_baseline:
        # The stand-in's block-3 maps are ~1e-3 (classifier weights × 0.1): a scale of that size lets
        # the overlays show colour, as the shipped card's fitted scale does on real films.
        add_heatmap_baseline(root / "chest", scale=STAND_IN_BLOCK3_SCALE)
    return root
