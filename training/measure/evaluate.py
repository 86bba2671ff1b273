"""Evaluate a shipped model folder on a manifest split, through the same loading path as inference."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from diagnosis.backends import make_runner
from diagnosis.cards import ModelCard, read_card
from diagnosis.network import load_model

from ..data.datasets import CHEST_LABELS, NIH_SOURCES, Record
from ..data.tasks import Task
from ..features import service_logits
from ..runtime import pick_device
from .metrics import auc_report, bootstrap_auc_intervals, classification_report, masked_auc


def task_for_card(card: ModelCard) -> Task:
    if card.role == "gate":
        return Task("gate", card.labels, card.activation)
    if card.role == "body_part":
        return Task("body_part", card.labels, card.activation)
    if card.body_part == "chest" and set(card.labels) <= set(CHEST_LABELS):
        return Task("chest", card.labels, card.activation, card.extra_outputs)
    raise SystemExit(f"no evaluation on this data for an abnormality model of {card.body_part!r}")


def select(records: list[Record], task: Task, split: str) -> list[Record]:
    return [r for r in records if (split == "all" or r.split == split) and task.applies(r)]


def decisions(card: ModelCard, probs: np.ndarray) -> np.ndarray:
    if card.role == "gate":
        xray = card.labels.index(card.positive_label)
        return np.where(probs[:, xray] >= card.threshold(card.positive_label), xray, 1 - xray)
    return probs.argmax(axis=1)


def chest_targets(card: ModelCard, records: list[Record]) -> np.ndarray:
    """(N, len(card.outputs)) targets; NaN where a label is unknown."""
    task = task_for_card(card)
    return np.stack([task.target(r) for r in records]) if records else np.zeros((0, len(card.outputs)))


def chest_report(card: ModelCard, records: list[Record], probs: np.ndarray, rounds: int = 1000) -> dict:
    """Per-label AUCs and their mean on NIH films (with 95 % bootstrap intervals), ``abnormal_auc``
    on NIH films, and the same on all sources and per source, where other hospitals join in."""
    truth = chest_targets(card, records)
    n_labels = len(card.labels)
    nih = np.asarray([r.source in NIH_SOURCES for r in records])
    films = "NIH ChestX-ray14 films (sources " + " + ".join(NIH_SOURCES) + ")"
    if not nih.any():  # other data (e.g. a native layout with its own source name): all films
        nih, films = np.ones(len(records), dtype=bool), "all films (no NIH source among them)"
    report = auc_report(card.labels, truth[nih, :n_labels], probs[nih, :n_labels])
    report.update(bootstrap_auc_intervals(card.labels, truth[nih, :n_labels], probs[nih, :n_labels], rounds))
    report["films"] = films
    abnormal = card.outputs.index("abnormal") if "abnormal" in card.extra_outputs else None
    if abnormal is not None:
        intervals = bootstrap_auc_intervals(["abnormal"], truth[nih][:, [abnormal]], probs[nih][:, [abnormal]], rounds)
        report["abnormal_auc"] = masked_auc(truth[nih, abnormal], probs[nih, abnormal])
        report["abnormal_auc_ci"] = intervals["auc_ci"].get("abnormal")
    if not nih.all():
        everything = auc_report(card.labels, truth[:, :n_labels], probs[:, :n_labels])
        report["all_sources"] = {"n": len(records), "auc": everything["auc"], "mean_auc": everything["mean_auc"]}
        if abnormal is not None:
            report["all_sources"]["abnormal_auc"] = masked_auc(truth[:, abnormal], probs[:, abnormal])
            report["per_source"] = per_source_abnormal(records, truth[:, abnormal], probs[:, abnormal], nih)
    return report


def per_source_abnormal(records: list[Record], truth: np.ndarray, scores: np.ndarray, nih: np.ndarray) -> dict:
    """Per source: abnormal AUC within it where it has both classes; for a one-class source, the AUC
    against NIH films of the other class (COVID films vs NIH normals, RSNA normals vs NIH abnormals),
    which a source detector would also score well on, so read it beside the NIH-only figure."""
    sources = np.asarray([r.source for r in records])
    result = {}
    for source in sorted(set(sources)):
        mine = sources == source
        known = mine & ~np.isnan(truth)
        entry = {"n": int(mine.sum()), "abnormal": int(np.nansum(truth[mine])),
                 "mean_abnormal_probability": float(scores[mine].mean())}
        classes = set(truth[known].tolist())
        if len(classes) == 2:
            entry["abnormal_auc"] = masked_auc(truth[known], scores[known])
        elif len(classes) == 1 and source not in NIH_SOURCES:
            other = nih & (truth == 1 - classes.pop())
            both = known | other
            entry["abnormal_auc_vs_nih_other_class"] = masked_auc(truth[both], scores[both])
        result[source] = entry
    return result


def model_outputs(folder: Path | str, records: list[Record], device: str = "auto", backend: str = "torch",
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities and targets of a model folder on the records whose file the service's intake
    reads, seen and run as the service sees and runs them (``training.features.service_logits``;
    ``backend`` "onnx": ONNX Runtime on the CPU, several times faster than eager torch there), and
    the mask of those records: a file the intake refuses is dropped, never scored."""
    torch_device = pick_device(device) if backend == "torch" else torch.device("cpu")
    card, model = load_model(folder, torch_device)
    task = task_for_card(card)
    with tempfile.TemporaryDirectory() as cache:  # this export only: the service caches its own
        runner = make_runner(backend, model, card, torch_device, Path(cache))
        logits, read = service_logits(runner, card.input, [r.path for r in records], batch_size)
    logits = logits.astype(np.float64).reshape(int(read.sum()), len(card.outputs))
    targets = np.stack([task.target(r) for r, ok in zip(records, read, strict=True) if ok]) if read.any() \
        else np.zeros((0,))
    if task.activation == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True), targets, read
    return 1 / (1 + np.exp(-logits)), targets, read


def evaluate_model(folder: Path | str, records: list[Record], split: str = "test", device: str = "auto",
                   batch_size: int = 64, plots: Path | None = None, bootstrap_rounds: int = 1000,
                   backend: str = "torch") -> dict:
    card = read_card(folder, verify=False)
    chosen = select(records, task_for_card(card), split)
    if not chosen:
        raise SystemExit(f"no rows of split {split!r} apply to model {card.name!r}")
    probs, targets, read = model_outputs(folder, chosen, device, backend, batch_size)
    refused = int((~read).sum())  # the service refuses these files: they are not scored
    chosen = [r for r, ok in zip(chosen, read, strict=True) if ok]
    task = task_for_card(card)
    if task.activation == "sigmoid":
        report = chest_report(card, chosen, probs, bootstrap_rounds)
        if plots:
            nih = [i for i, r in enumerate(chosen) if r.source in NIH_SOURCES] or list(range(len(chosen)))
            plot_roc(card.labels, chest_targets(card, chosen)[nih], probs[nih], Path(plots) / f"{card.name}_roc.png")
    else:
        predicted = decisions(card, probs)
        report = classification_report(card.labels, targets, probs, predicted)
        report["per_kind"] = per_group_accuracy(chosen, targets, predicted)
        if plots:
            plot_confusion(report["confusion"], Path(plots) / f"{card.name}_confusion.png")
    report.update(model=card.name, version=card.version, split=split, refused_by_intake=refused)
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
        known = ~np.isnan(truth[:, index])
        column, scores = truth[known, index], probs[known, index]
        if len(column) == 0 or column.min() == column.max():
            continue
        fpr, tpr, _ = roc_curve(column, scores)
        axis.plot(fpr, tpr, label=f"{label} ({roc_auc_score(column, scores):.3f})")
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
