"""Turn a training run into a shipped model folder: fp16 safetensors + a card with measured metrics."""

from __future__ import annotations

import json
import logging
import platform
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from diagnosis.cards import CARD_FILE, InputSpec, ModelCard, WeightsSpec, write_card
from diagnosis.network import DenseNetClassifier, save_weights

from ..data.datasets import NIH_SOURCES, SYNTHETIC_PREFIX, Record
from ..data.tasks import Task
from ..measure.evaluate import evaluate_model, model_outputs
from ..measure.metrics import youden_threshold
from . import EXPORT_OWNS, POST_HOC

log = logging.getLogger(__name__)

LICENCES = {  # from the xray-pack README; carried forward into every card that uses the source
    "nih_cxr14": "NIH public release, citation requested (Wang et al. 2017)",
    "hand_boneage": "RSNA Pediatric Bone Age 2017: research use, not cleared for commercial use",
    "shoulder_implant": "CC BY 4.0 (assumed)",
    "knee_oa": "CC BY 4.0 (assumed)",
    "spine_scoliosis": "unknown",
    "dental_panoramic": "unknown",
    "hip_ddh": "CC BY 4.0",
    "hip_pelvis": "unknown",
    "wrist_pedwri": "CC BY 4.0 (assumed)",
    "imagenet_samples": "ImageNet terms (non-commercial research)",
    "neg_mri_brain": "unknown",
    "neg_fundus": "research use / CC BY 4.0",
    "neg_clothing": "CC0",
    "neg_faces": "UTKFace: non-commercial research",
    "neg_receipts": "ICDAR-2019 SROIE: research / competition use",
    "neg_ct_chest": "research use; publishers' copyright",
    "neg_ct_head": "unknown",
    "neg_ultrasound": "CC0 (assumed)",
    "neg_dermoscopy": "ISIC: mostly CC0 / CC BY (per image)",
    "nih_extra": "NIH public release, citation requested (Wang et al. 2017)",
    "rsna_normal": "RSNA Pneumonia Challenge via the COVID-19 Radiography Database: research use; "
                   "NIH terms for the images",
    "cxr_normal_paediatric": "Guangzhou paediatric films via the COVID-19 Radiography Database: "
                             "research use (assumed)",
    "covid_radiography": "COVID-19 Radiography Database (PadChest/BIMCV, Hannover, paper figures): mixed, "
                         "research use (assumed)",
}

def licence(source: str) -> str:
    if source.startswith(SYNTHETIC_PREFIX):  # training.data.synthetic_photos keeps the radiograph's licence
        original = source.removeprefix(SYNTHETIC_PREFIX)
        return f"synthetic phone photos of {original}: {licence(original)}"
    return LICENCES.get(source, "see dataset")


ROLES = {"gate": "gate", "body_part": "body_part", "chest": "abnormality"}


def export_run(run_dir: Path, out: Path, records: list[Record], data_name: str, device: str = "auto",
               dtype: torch.dtype = torch.float16, flip_average: bool = False, backend: str = "torch") -> ModelCard:
    run_dir, out = Path(run_dir), Path(out)
    meta = json.loads((run_dir / "state.json").read_text())
    task = Task(meta["task"]["name"], meta["task"]["labels"], meta["task"]["activation"],
                meta["task"].get("extra_outputs", []))
    config = meta["config"]
    model = DenseNetClassifier(len(task.outputs), flip_average=flip_average)  # thresholds see what the service sees
    model.load_state_dict({k: v.float() for k, v in load_file(str(run_dir / "best.safetensors")).items()})
    positive = "xray" if task.name == "gate" else None
    previous = _previous_card(out)
    sha, dtype_name = save_weights(model, out, dtype=dtype)
    # What the run trained on (recorded by train), else the train rows of the data given here.
    sources = meta.get("train_sources") or Counter(r.source for r in records if r.split == "train" and task.applies(r))
    card = ModelCard(
        name=out.name,
        version=date.today().isoformat(),
        role=ROLES[task.name],
        body_part="chest" if task.name == "chest" else None,
        labels=task.labels,
        extra_outputs=task.extra_outputs,
        activation=task.activation,
        input=InputSpec(size=config["size"], mean=config["mean"], std=config["std"]),
        positive_label=positive,
        data_sources=[{"source": s, "train_images": n, "licence": licence(s)} for s, n in sorted(sources.items())],
        training={
            "data": meta.get("data") or data_name,
            "initialisation": meta["initialisation"],
            "recipe": {k: config[k] for k in ("optimizer", "lr", "betas", "weight_decay", "batch_size", "epochs",
                                              "epoch_size", "balance", "plateau_patience", "plateau_factor",
                                              "seed", "size", "abnormal_c", "refit_findings_c", "fine_tuned",
                                              "schedule", "dropout", "augmentation", "selection", "soup",
                                              "recipe_of_the_backbone")
                                    if k in config}
                      | ({"group_shares": config["group_shares"]} if config.get("group_shares") else {})
                      | {k: config[k] for k in ("quarter_turns", "turn_loss") if config.get(k)},
            "epochs_run": len(meta["history"]),
            "best_smoothed_val": meta["best"],
            "history": meta["history"],
            "train_seconds": round(meta["train_seconds"]),
            "hardware": meta.get("hardware") or f"{meta['device']} · {platform.processor() or platform.machine()}",
            "loss": "cross-entropy" if task.activation == "softmax"
                    else "binary cross-entropy over known labels (unknown ones give no loss)",
        },
        weights=WeightsSpec(sha256=sha, dtype=dtype_name),
        flip_average=flip_average,
    )
    card = keep_sections(card, previous)
    write_card(out, card)
    set_operating_points(out, card, task, records, device, backend)
    write_card(out, card)
    test = evaluate_model(out, records, "test", device=device, backend=backend)
    manifests = " ".join(f"--manifest {name.strip()}" for name in data_name.split(","))
    card.metrics = card.metrics | {
        "test": test, "measured_with": f"python -m training evaluate --model {out} {manifests} --split test"}
    write_card(out, card)
    return card


def _previous_card(folder: Path) -> dict | None:
    path = folder / CARD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def keep_sections(card: ModelCard, previous: dict | None) -> ModelCard:
    """``card`` with every field export does not own taken from the card it replaces (open set,
    modality, orientation, calibration, operating points, other metrics…), so re-exporting never
    erases a post-hoc section. Sections fitted on other weights are kept but named in a warning:
    the recipe (training/train_pack.sh) refits them after the last export."""
    if not previous:
        return card
    kept = {k: v for k, v in previous.items() if k not in EXPORT_OWNS and v not in (None, {}, [])}
    fresh = card.model_dump(mode="json")
    merged = fresh | kept
    merged["metrics"] = previous.get("metrics", {}) | fresh["metrics"]
    if previous.get("weights", {}).get("sha256") != card.weights.sha256:
        stale = sorted({POST_HOC[k] for k in kept if k in POST_HOC})
        if stale:
            log.warning("kept card sections fitted on the previous weights; refit them: %s",
                        ", ".join(f"python -m training {c}" for c in stale))
    try:
        return ModelCard.model_validate(merged)
    except ValueError as error:
        raise SystemExit(f"the card in {card.name!r} has sections that do not fit the new run ({error}); "
                         "refit them or remove them from card.json before exporting") from None


def set_operating_points(folder: Path, card: ModelCard, task: Task, records: list[Record], device: str,
                         backend: str) -> None:
    """Thresholds from the val split only, on the outputs of the folder as shipped (fp16 weights)."""
    val = [r for r in records if r.split == "val" and task.applies(r)]
    if task.name == "chest":  # NIH films: the other chest sources differ in hospital and population too
        val = [r for r in val if r.source in NIH_SOURCES] or val
    probs, targets, read = model_outputs(folder, val, device, backend)  # files the intake refuses are dropped
    val = [r for r, ok in zip(val, read, strict=True) if ok]
    if task.name == "chest":
        for i, label in enumerate(task.labels):
            known = ~np.isnan(targets[:, i])
            card.thresholds[label] = youden_threshold(targets[known, i], probs[known, i])
        card.threshold_method = f"Youden's J per label on the val split ({len(val)} images)"
    elif task.name == "gate":
        index = task.labels.index(card.positive_label)
        card.thresholds = {card.positive_label: youden_threshold((targets == index).astype(int), probs[:, index])}
        card.threshold_method = f"Youden's J on P(xray), val split ({len(val)} images)"
    else:
        top = probs.max(axis=1)
        correct = probs.argmax(axis=1) == targets
        # Ask for a clearer image only when less confident than 98 % of correct val answers.
        card.min_confidence = float(min(0.6, np.quantile(top[correct], 0.02))) if correct.any() else 0.5
        card.threshold_method = ("min_confidence = 2nd percentile of top-1 probability of correct val answers "
                                 f"({len(val)} images)")
