"""From a model's raw outputs to what a reply may say: calibrated probabilities, flags, a verdict.

Everything comes from the card (``calibration`` and ``operating_points``, written by ``python -m
training calibrate`` on the val split). Two modes:

- ``screening`` (the default, for lay users): only labels the model is good enough at (``eligible``)
  are flagged, and only above their high-specificity point.
- ``clinician``: every label at its per-label point (on val: specificity ≥ 0.85 and few ▲ per normal
  film, see ``training.card.calibrate``), with its figures; listed by estimate relative to its point.

The verdict does not depend on the mode: "see_doctor" when the normal-vs-abnormal score crosses its
point or any screening flag is raised, "urgent" only for a flagged label whose card point allows it,
"no_strong_sign" otherwise, and "unsure" for a card without validated points (older cards): then
screening flags nothing, and clinician mode uses the card's legacy ``thresholds``.
"""

from __future__ import annotations

import numpy as np

from contract.envelope import MODES

from .cards import LabelPoint, ModelCard
from .report import Finding

_EPS = 1e-12


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -60, 60)))


def calibrated(card: ModelCard, raw: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of every output (rows × outputs); outputs without parameters stay raw."""
    raw = np.asarray(raw, dtype=np.float64)
    out = raw.copy()
    params = card.calibration.params if card.calibration else {}
    for index, name in enumerate(card.outputs):
        if name in params:
            out[..., index] = sigmoid(params[name].a * logit(raw[..., index]) + params[name].b)
    return out


def abnormal_score(card: ModelCard, calibrated_row: np.ndarray) -> float | None:
    """The normal-vs-abnormal score: the calibrated ``abnormal`` output, else the card's fitted
    combination of the labels (``verdict.output == "findings_score"``), else None."""
    if "abnormal" in card.extra_outputs:
        return float(calibrated_row[card.outputs.index("abnormal")])
    verdict = card.operating_points.verdict if card.operating_points else None
    if verdict is not None and verdict.output == "findings_score" and verdict.weights:
        z = float(np.dot(verdict.weights, logit(calibrated_row[: len(card.labels)])) + (verdict.bias or 0.0))
        return float(sigmoid(z))
    return None


def _figures(point: LabelPoint | None) -> dict:
    figures = point.val if point is not None else None
    if figures is None:
        return {}
    return {"sensitivity": figures.sensitivity, "specificity": figures.specificity, "ppv": figures.ppv,
            "auc": figures.auc}


def screening_flags(card: ModelCard, calibrated_row: np.ndarray) -> list[str]:
    """Labels flagged at their screening point (eligible ones only)."""
    points = card.operating_points.screening if card.operating_points else {}
    flagged = []
    for label, p in zip(card.labels, calibrated_row[: len(card.labels)], strict=True):
        point = points.get(label)
        if point is not None and point.eligible and point.threshold is not None and p >= point.threshold:
            flagged.append(label)
    return flagged


def verdict_of(card: ModelCard, calibrated_row: np.ndarray) -> str:
    points = card.operating_points
    if points is None or points.verdict is None:
        return "unsure"
    flagged = screening_flags(card, calibrated_row)
    if any(points.screening[label].urgent for label in flagged):
        return "urgent"
    score = abnormal_score(card, calibrated_row)
    if flagged or (score is not None and score >= points.verdict.threshold):
        return "see_doctor"
    return "no_strong_sign"


def assess(card: ModelCard, raw_row: np.ndarray, mode: str = "screening") -> tuple[list[Finding], float | None, str]:
    """Findings flagged in ``mode`` (screening: highest calibrated probability first; clinician:
    highest relative to its point first), the calibrated abnormal score and the verdict (the same in
    both modes), for one image's raw outputs."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {MODES}")
    row = calibrated(card, raw_row)
    points = card.operating_points
    flagged = set(screening_flags(card, row))
    findings = []
    for label, p in zip(card.labels, row[: len(card.labels)], strict=True):
        screen = points.screening.get(label) if points else None
        eligible = bool(screen is not None and screen.eligible and screen.threshold is not None)
        if mode == "screening":
            point, threshold, positive = screen, (screen.threshold if eligible else None), label in flagged
        else:
            point = points.clinician.get(label) if points else None
            # A card with clinician points: a label without one is listed, never ▲ (no point was right on
            # val). A card without operating points: the card's legacy thresholds.
            threshold = (point.threshold if point is not None else None) if points and points.clinician \
                else card.threshold(label)
            positive = bool(threshold is not None and p >= threshold)
        urgent = bool(mode == "screening" and positive and screen is not None and screen.urgent)
        findings.append(Finding(label=label, probability=float(p), positive=positive, threshold=threshold,
                                eligible=eligible, urgent=urgent, **_figures(point)))
    # Screening: highest estimate first. Clinician: highest relative to its own point first, so the
    # ▲ findings lead and a low estimate with a low point is not buried under a high one with a high point.
    findings.sort(key=(lambda f: f.probability) if mode == "screening" else (lambda f: f.margin), reverse=True)
    return findings, abnormal_score(card, row), verdict_of(card, row)


def verdict_point(card: ModelCard) -> dict[str, float | None]:
    """The verdict's threshold and the figures a reply quotes (empty for a card without one).

    The point was chosen on val; what a user is told about its errors is the worse of val and test
    for each figure (lower sensitivity, specificity and PPV), so the reply never flatters the check."""
    verdict = card.operating_points.verdict if card.operating_points else None
    if verdict is None:
        return {}

    def worst(name: str) -> float | None:
        values = [getattr(f, name) for f in (verdict.val, verdict.test) if f is not None]
        values = [v for v in values if v is not None]
        return min(values) if values else None

    return {"threshold": verdict.threshold, "sensitivity": worst("sensitivity"),
            "specificity": worst("specificity"), "ppv": worst("ppv")}
