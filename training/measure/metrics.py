"""Metrics and operating points, all from scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve


def classification_report(labels: list[str], truth: np.ndarray, probabilities: np.ndarray,
                          predicted: np.ndarray | None = None) -> dict:
    """Gate / body part: {"n", "accuracy", "balanced_accuracy", "per_class", "confusion"}.

    ``predicted`` overrides the arg-max decision (the gate decides with its card threshold)."""
    if predicted is None:
        predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, labels=list(range(len(labels))))
    per_class = {}
    for index, label in enumerate(labels):
        support = int(matrix[index].sum())
        per_class[label] = {
            "n": support,
            "recall": float(matrix[index, index] / support) if support else None,
        }
    recalls = [c["recall"] for c in per_class.values() if c["recall"] is not None]
    return {
        "n": len(truth),
        "accuracy": float(accuracy_score(truth, predicted)) if len(truth) else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "per_class": per_class,
        "confusion": {"labels": labels, "matrix": matrix.tolist()},
    }


def auc_report(labels: list[str], truth: np.ndarray, probabilities: np.ndarray) -> dict:
    """Chest: {"n", "auc": {label: value}, "mean_auc", "skipped_labels", "positives"}.

    NaN in ``truth`` is an unknown label: that image is left out of that label's AUC."""
    aucs, skipped = {}, []
    for index, label in enumerate(labels):
        auc = masked_auc(truth[:, index], probabilities[:, index])
        if auc is None:  # no positives or no negatives: AUC undefined
            skipped.append(label)
        else:
            aucs[label] = auc
    return {
        "n": len(truth),
        "auc": aucs,
        "mean_auc": float(np.mean(list(aucs.values()))) if aucs else None,
        "skipped_labels": skipped,
        "positives": {label: int(np.nansum(truth[:, i])) for i, label in enumerate(labels)},
    }


def masked_auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    known = ~np.isnan(truth)
    truth, scores = truth[known], scores[known]
    if len(truth) == 0 or truth.min() == truth.max():
        return None
    return float(roc_auc_score(truth, scores))


def _rank_auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """AUC as the Mann-Whitney statistic (ties count half): roc_auc_score's value, without its
    per-call overhead, for the thousands of bootstrap resamples."""
    from scipy.stats import rankdata

    known = ~np.isnan(truth)
    truth, scores = truth[known], scores[known]
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[truth == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def bootstrap_auc_intervals(labels: list[str], truth: np.ndarray, probabilities: np.ndarray,
                            rounds: int = 1000, seed: int = 0) -> dict:
    """95 % percentile intervals of each label's AUC and of their mean, resampling images.

    {"auc_ci": {label: [low, high]}, "mean_auc_ci": [low, high], "rounds"}. A resample with no
    positives of a label has no AUC for it; the mean of a resample is over the labels it has."""
    rng = np.random.default_rng(seed)
    per_label: dict[str, list[float]] = {label: [] for label in labels}
    means = []
    for _ in range(rounds):
        rows = rng.integers(0, len(truth), len(truth))
        values = [_rank_auc(truth[rows, i], probabilities[rows, i]) for i in range(len(labels))]
        for label, value in zip(labels, values, strict=True):
            if value is not None:
                per_label[label].append(value)
        known = [v for v in values if v is not None]
        if known:
            means.append(float(np.mean(known)))

    def interval(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    return {"auc_ci": {label: interval(v) for label, v in per_label.items() if v}, "mean_auc_ci": interval(means),
            "rounds": rounds}


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """Operating point maximising sensitivity + specificity − 1 (Youden's J)."""
    if truth.min() == truth.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 1e-4, 1 - 1e-4))


ECE_BINS = 15


def ece(truth: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error with equal-width bins: Σ (n_bin / n) · |mean p − observed rate|."""
    if len(truth) == 0:
        return None
    index = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mine = index == b
        if mine.any():
            total += mine.sum() / len(truth) * abs(probs[mine].mean() - truth[mine].mean())
    return float(total)
