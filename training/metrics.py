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
    """Chest: {"n", "auc": {label: value}, "mean_auc", "skipped_labels"}."""
    aucs, skipped = {}, []
    for index, label in enumerate(labels):
        column = truth[:, index]
        if column.min() == column.max():  # no positives or no negatives: AUC undefined
            skipped.append(label)
            continue
        aucs[label] = float(roc_auc_score(column, probabilities[:, index]))
    return {
        "n": len(truth),
        "auc": aucs,
        "mean_auc": float(np.mean(list(aucs.values()))) if aucs else None,
        "skipped_labels": skipped,
        "positives": {label: int(truth[:, i].sum()) for i, label in enumerate(labels)},
    }


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """Operating point maximising sensitivity + specificity − 1 (Youden's J)."""
    if truth.min() == truth.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 1e-4, 1 - 1e-4))
