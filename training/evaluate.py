"""Evaluate a shipped model folder on a manifest split, through the same loading path as inference."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from diagnosis.cards import ModelCard
from diagnosis.network import load_model

from .datasets import CHEST_LABELS, Record
from .images import RecordDataset
from .metrics import auc_report, classification_report
from .tasks import Task
from .train import pick_device, predict


def task_for_card(card: ModelCard) -> Task:
    if card.role == "gate":
        return Task("gate", card.labels, card.activation)
    if card.role == "body_part":
        return Task("body_part", card.labels, card.activation)
    if card.body_part == "chest" and set(card.labels) <= set(CHEST_LABELS):
        return Task("chest", card.labels, card.activation)
    raise SystemExit(f"no evaluation on this data for an abnormality model of {card.body_part!r}")


def select(records: list[Record], task: Task, split: str) -> list[Record]:
    return [r for r in records if (split == "all" or r.split == split) and task.applies(r)]


def decisions(card: ModelCard, probs: np.ndarray) -> np.ndarray:
    if card.role == "gate":
        xray = card.labels.index(card.positive_label)
        return np.where(probs[:, xray] >= card.threshold(card.positive_label), xray, 1 - xray)
    return probs.argmax(axis=1)


def chest_targets(card: ModelCard, records: list[Record]) -> np.ndarray:
    columns = [CHEST_LABELS.index(label) for label in card.labels]
    return np.asarray([[r.chest_labels[c] for c in columns] for r in records], dtype=np.float32)


def evaluate_model(folder: Path | str, records: list[Record], split: str = "test", device: str = "auto",
                   batch_size: int = 64, plots: Path | None = None) -> dict:
    card, model = load_model(folder, pick_device(device))
    device_ = next(model.parameters()).device
    task = task_for_card(card)
    chosen = select(records, task, split)
    if not chosen:
        raise SystemExit(f"no rows of split {split!r} apply to model {card.name!r}")
    dataset = RecordDataset(chosen, task, card.input.size, card.input.mean, card.input.std, cache_side=None)
    probs, targets, _ = predict(model.to(memory_format=torch.channels_last), dataset,
                                batch_size, device_, task.activation)
    if task.activation == "sigmoid":
        report = auc_report(card.labels, chest_targets(card, chosen), probs)
        if plots:
            plot_roc(card.labels, chest_targets(card, chosen), probs, Path(plots) / f"{card.name}_roc.png")
    else:
        predicted = decisions(card, probs)
        report = classification_report(card.labels, targets, probs, predicted)
        report["per_kind"] = per_group_accuracy(chosen, targets, predicted)
        if plots:
            plot_confusion(report["confusion"], Path(plots) / f"{card.name}_confusion.png")
    report.update(model=card.name, version=card.version, split=split)
    return report


def per_group_accuracy(records: list[Record], truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy by kind (natural photo, fundus, phone photo of a film…): where hard cases hide."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for record, t, p in zip(records, truth, predicted, strict=True):
        key = "phone_photo_of_film" if record.phone_photo else record.kind
        groups[key].append(bool(t == p))
    return {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(groups.items())}


def plot_roc(labels: list[str], truth: np.ndarray, probs: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 7))
    for index, label in enumerate(labels):
        if truth[:, index].min() == truth[:, index].max():
            continue
        fpr, tpr, _ = roc_curve(truth[:, index], probs[:, index])
        axis.plot(fpr, tpr, label=f"{label} ({roc_auc_score(truth[:, index], probs[:, index]):.3f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axis.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC per label")
    axis.legend(fontsize=7, loc="lower right")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_confusion(confusion: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(np.asarray(confusion["matrix"]), display_labels=confusion["labels"]).plot(
        ax=axis, colorbar=False, xticks_rotation=45)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
