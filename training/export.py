"""Turn a training run into a shipped model folder: fp16 safetensors + a card with measured metrics."""

from __future__ import annotations

import json
import platform
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from diagnosis.cards import InputSpec, ModelCard, WeightsSpec, write_card
from diagnosis.network import DenseNetClassifier, save_weights

from .datasets import SYNTHETIC_PREFIX, Record
from .evaluate import evaluate_model
from .images import RecordDataset
from .metrics import youden_threshold
from .tasks import Task
from .train import pick_device, predict

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
}
def licence(source: str) -> str:
    if source.startswith(SYNTHETIC_PREFIX):  # training.synthetic_photos keeps the radiograph's licence
        original = source.removeprefix(SYNTHETIC_PREFIX)
        return f"synthetic phone photos of {original}: {licence(original)}"
    return LICENCES.get(source, "see dataset")


ROLES = {"gate": "gate", "body_part": "body_part", "chest": "abnormality"}


def export_run(run_dir: Path, out: Path, records: list[Record], data_name: str, device: str = "auto",
               dtype: torch.dtype = torch.float16, flip_average: bool = False) -> ModelCard:
    run_dir, out = Path(run_dir), Path(out)
    meta = json.loads((run_dir / "state.json").read_text())
    task = Task(meta["task"]["name"], meta["task"]["labels"], meta["task"]["activation"])
    config = meta["config"]
    model = DenseNetClassifier(len(task.labels), flip_average=flip_average)  # thresholds see what the service sees
    model.load_state_dict({k: v.float() for k, v in load_file(str(run_dir / "best.safetensors")).items()})
    torch_device = pick_device(device)
    model.to(torch_device).to(memory_format=torch.channels_last)

    # Operating points come from the val split only.
    val = [r for r in records if r.split == "val" and task.applies(r)]
    val_set = RecordDataset(val, task, config["size"], config["mean"], config["std"], cache_side=None)
    probs, targets, _ = predict(model, val_set, 64, torch_device, task.activation)
    thresholds, method, min_confidence, positive = {}, "", None, None
    if task.name == "chest":
        truth = np.asarray([r.chest_labels for r in val], dtype=np.float32)
        thresholds = {label: youden_threshold(truth[:, i], probs[:, i]) for i, label in enumerate(task.labels)}
        method = f"Youden's J per label on the val split ({len(val)} images)"
    elif task.name == "gate":
        positive = "xray"
        index = task.labels.index(positive)
        thresholds = {positive: youden_threshold((targets == index).astype(int), probs[:, index])}
        method = f"Youden's J on P(xray), val split ({len(val)} images)"
    else:
        top = probs.max(axis=1)
        correct = probs.argmax(axis=1) == targets
        # Ask for a clearer image only when less confident than 98 % of correct val answers.
        min_confidence = float(min(0.6, np.quantile(top[correct], 0.02))) if correct.any() else 0.5
        method = f"min_confidence = 2nd percentile of top-1 probability of correct val answers ({len(val)} images)"

    sha, dtype_name = save_weights(model, out, dtype=dtype)
    # What the run trained on (recorded by train), else the train rows of the data given here.
    sources = meta.get("train_sources") or Counter(r.source for r in records if r.split == "train" and task.applies(r))
    card = ModelCard(
        name=out.name,
        version=date.today().isoformat(),
        role=ROLES[task.name],
        body_part="chest" if task.name == "chest" else None,
        labels=task.labels,
        activation=task.activation,
        input=InputSpec(size=config["size"], mean=config["mean"], std=config["std"]),
        thresholds=thresholds,
        threshold_method=method or "arg-max",
        positive_label=positive,
        min_confidence=min_confidence,
        data_sources=[{"source": s, "train_images": n, "licence": licence(s)} for s, n in sorted(sources.items())],
        training={
            "data": meta.get("data") or data_name,
            "initialisation": meta["initialisation"],
            "recipe": {k: config[k] for k in ("optimizer", "lr", "betas", "weight_decay", "batch_size", "epochs",
                                              "epoch_size", "balance", "plateau_patience", "plateau_factor",
                                              "seed", "size")},
            "epochs_run": len(meta["history"]),
            "best_smoothed_val": meta["best"],
            "history": meta["history"],
            "train_seconds": round(meta["train_seconds"]),
            "hardware": meta.get("hardware") or f"{meta['device']} · {platform.processor() or platform.machine()}",
            "loss": "cross-entropy" if task.activation == "softmax" else "binary cross-entropy",
        },
        weights=WeightsSpec(sha256=sha, dtype=dtype_name),
        flip_average=flip_average,
    )
    write_card(out, card)
    test = evaluate_model(out, records, "test", device=device)
    card.metrics = {"test": test, "measured_with": f"python -m training evaluate --model {out} "
                                                  f"--manifest <{data_name}> --split test"}
    write_card(out, card)
    return card
