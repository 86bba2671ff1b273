"""Train one of the paper's classifiers (gate, body part, chest) in plain PyTorch.

Checkpoints every epoch (safetensors + JSON, no pickle) and resumes from them. The best epoch is
chosen on a smoothed validation metric — never on the test split.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from diagnosis.cards import read_card
from diagnosis.network import DenseNetClassifier

from ..data.datasets import NIH_SOURCES, Record
from ..data.images import Augment, RecordDataset
from ..data.tasks import Task
from ..measure.metrics import auc_report, classification_report
from ..runtime import _loss, autocast, pick_device, predict
from .checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

RECIPES = {  # the paper's defaults; every value can be overridden from the CLI
    "gate": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5, "epochs": 10},
    "body_part": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5, "epochs": 10},
    "chest": {"optimizer": "radam", "lr": 1e-4, "weight_decay": 3e-4, "epochs": 20},
}


@dataclass
class TrainConfig:
    task: str
    out: Path
    size: int = 128
    mean: float = 0.5
    std: float = 0.25
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    plateau_patience: int = 3
    plateau_factor: float = 0.1
    epoch_size: int | None = None  # samples per epoch; None = every train record once
    balance: bool = True
    # with balance: each balance group's share of an epoch (default 1 each), e.g. {"covid_radiography": 0.1}
    group_shares: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    init_from: Path | None = None  # a model folder or run whose backbone starts this one
    imagenet_weights: Path | None = None  # torchvision DenseNet-121 ImageNet weights as safetensors
    device: str = "auto"
    num_workers: int = 0  # DataLoader workers; > 0 also decodes the data set in parallel up front
    val_limit: int | None = None
    max_minutes: float | None = None  # stop after the epoch that passes this wall-clock budget
    # share of training images turned by 90/180/270 degrees; with it, each val image is shown at one
    # fixed turn too (a quarter of them upright), so the best epoch is chosen on turned films as well
    quarter_turns: float = 0.0
    # weight of a second loss that asks the final feature map how many quarter turns a radiograph was
    # given (a linear layer used in training only): keeps the turn readable for the card's orientation
    # head, which is fitted afterwards on those frozen features
    turn_loss: float = 0.0
    extra: dict = field(default_factory=dict)


def describe_hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed)


def initialise(model: DenseNetClassifier, config: TrainConfig, outputs: list[str]) -> str:
    """Load a starting backbone. Returns a description recorded in the card.

    From a model of the same task the whole network continues; outputs it lacks (a new extra
    output such as "abnormal") start fresh, the others keep their classifier rows."""
    if config.imagenet_weights is not None:
        path = Path(config.imagenet_weights)
        if not path.is_file():
            raise SystemExit(
                f"ImageNet weights not found at {path}. Offline, convert torchvision's "
                "DenseNet121_Weights.IMAGENET1K_V1 to safetensors on a machine with internet and pass its path. "
                "Refusing to silently train from scratch."
            )
        state = load_file(str(path))
        conv = state.get("features.conv0.weight")
        if conv is not None and conv.shape[1] == 3:  # RGB stem → grayscale stem: sum over colour
            state["features.conv0.weight"] = conv.sum(dim=1, keepdim=True)
        backbone = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = model.load_state_dict(backbone, strict=False).missing_keys
        if any(k.startswith("features.") for k in missing):
            raise SystemExit(f"{path} is not a torchvision DenseNet-121 state dict")
        return f"ImageNet (torchvision DenseNet-121) from {path.name}"
    if config.init_from is not None:
        source = Path(config.init_from)
        file = source / "weights.safetensors"  # a model folder…
        if not file.is_file():
            file = source / "best.safetensors"  # …or a training run
        state = {k: v.float() for k, v in load_file(str(file)).items()}
        previous = _outputs_of(source) or []
        if previous and set(previous) <= set(outputs):  # the same task, perhaps with new outputs
            model.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")}, strict=False)
            with torch.no_grad():
                for name in previous:
                    model.classifier.weight[outputs.index(name)] = state["classifier.weight"][previous.index(name)]
                    model.classifier.bias[outputs.index(name)] = state["classifier.bias"][previous.index(name)]
            new = [name for name in outputs if name not in previous]
            return f"{source.name} ({file.name}), whole network" + (f"; new outputs {new}" if new else "")
        model.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")}, strict=False)
        return f"backbone of {source.name} ({file.name})"
    return "random (from scratch)"


def _outputs_of(source: Path) -> list[str] | None:
    """Output names of a model folder (its card) or a training run (state.json)."""
    if (source / "card.json").is_file():
        return read_card(source, verify=False).outputs
    if (source / "state.json").is_file():
        task = json.loads((source / "state.json").read_text())["task"]
        return task["labels"] + task.get("extra_outputs", [])
    return None


def validation_metric(task: Task, probs: np.ndarray, targets: np.ndarray) -> tuple[str, float]:
    if task.activation == "softmax":
        return "balanced_accuracy", classification_report(task.labels, targets, probs)["balanced_accuracy"]
    return "mean_auc", auc_report(task.labels, targets, probs)["mean_auc"] or 0.0


def extra_metrics(task: Task, probs: np.ndarray, targets: np.ndarray) -> dict:
    """AUC of each extra output (e.g. abnormal) on the validation films."""
    report = auc_report(task.extra_outputs, targets[:, len(task.labels):], probs[:, len(task.labels):])
    return {f"{name}_auc": report["auc"].get(name) for name in task.extra_outputs}


def train(config: TrainConfig, task: Task, records: list[Record]) -> Path:
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_records = [r for r in records if r.split == "train" and task.applies(r)]
    val_records = [r for r in records if r.split == "val" and task.applies(r)]
    if task.name == "chest":  # chosen on NIH films only: other sources differ in more than findings
        val_records = [r for r in val_records if r.source in NIH_SOURCES] or val_records
    if config.val_limit and len(val_records) > config.val_limit:
        val_records = random.Random(config.seed).sample(val_records, config.val_limit)  # nosec B311
    if not train_records or not val_records:
        raise SystemExit(f"{task.name}: need train and val records, have {len(train_records)} / {len(val_records)}")
    log.info("%s: %d train, %d val records; labels %s", task.name, len(train_records), len(val_records), task.labels)

    model = DenseNetClassifier(len(task.outputs))
    initialisation = initialise(model, config, task.outputs)
    model.to(device).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    turn_layer = None
    if config.turn_loss:
        # DenseNet-121's final map: 1024 channels at 1/32 of the input side. Not checkpointed (it is
        # not shipped): a resumed run starts this layer afresh.
        turn_layer = torch.nn.Linear(1024 * (config.size // 32) ** 2, 4).to(device)
        params += list(turn_layer.parameters())
    if config.optimizer == "radam":
        optimizer = torch.optim.RAdam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)

    start_epoch, history, best, smoothed = 0, [], -1.0, None
    seconds_so_far = 0.0
    if (out / "state.json").is_file():
        meta = load_checkpoint(out, model, optimizer, scheduler)
        start_epoch, history = meta["epoch"] + 1, meta["history"]
        best, smoothed, seconds_so_far = meta["best"], meta["smoothed"], meta["train_seconds"]
        initialisation = meta["initialisation"]
        log.info("resuming %s at epoch %d", out, start_epoch + 1)

    train_set = RecordDataset(train_records, task, config.size, config.mean, config.std,
                              Augment(config.size, seed=config.seed, quarter_turns=config.quarter_turns),
                              cache={}, cache_side=2 * config.size, with_turns=turn_layer is not None)
    val_set = RecordDataset(val_records, task, config.size, config.mean, config.std, cache={},
                            cache_side=2 * config.size, fixed_turns=config.quarter_turns > 0)
    epoch_size = config.epoch_size or len(train_records)
    if config.num_workers > 0:
        train_set.warm(config.num_workers)
        val_set.warm(config.num_workers)
    session_started = time.time()
    if config.balance:
        groups = [task.balance_group(r) for r in train_records]
        counts = Counter(groups)
        weights = [config.group_shares.get(g, 1.0) / counts[g] for g in groups]
        log.info("balance groups: %s; shares %s", dict(counts), config.group_shares or "equal")
    else:
        weights = [1.0] * len(train_records)

    for epoch in range(start_epoch, config.epochs):
        started = time.time()
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        sampler = WeightedRandomSampler(weights, epoch_size, replacement=config.balance, generator=generator)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                            num_workers=config.num_workers, worker_init_fn=_reseed_worker,
                            pin_memory=device.type == "cuda")
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(loader, desc=f"{task.name} epoch {epoch + 1}/{config.epochs}", leave=False)
        for images, target, *turns in bar:
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            target = target.to(device)
            with autocast(device):
                feature_map = model.forward_features(images)
                logits = model.head(feature_map).float()
            loss = _loss(logits, target, task.activation)
            if turn_layer is not None and bool((turns[0] >= 0).any()):
                turn_logits = turn_layer(feature_map.float().flatten(1))
                loss = loss + config.turn_loss * torch.nn.functional.cross_entropy(
                    turn_logits, turns[0].to(device), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{running / seen:.4f}")
        probs, targets, val_loss = predict(model, val_set, 2 * config.batch_size, device, task.activation)
        metric_name, metric = validation_metric(task, probs, targets)
        extras = extra_metrics(task, probs, targets) if task.extra_outputs else {}
        smoothed = metric if smoothed is None else 0.5 * smoothed + 0.5 * metric  # val noise ≈ ±0.01
        scheduler.step(val_loss)
        seconds_so_far += time.time() - started
        if smoothed > best:
            best = smoothed
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(out / "best.safetensors.tmp"))
            (out / "best.safetensors.tmp").replace(out / "best.safetensors")  # a killed run keeps a whole file
        history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                        metric_name: metric, f"smoothed_{metric_name}": smoothed, **extras,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started})
        log.info("epoch %d: %s", epoch + 1, json.dumps(history[-1]))
        save_checkpoint(out, model, optimizer, scheduler, {
            "epoch": epoch, "history": history, "best": best, "smoothed": smoothed,
            "train_seconds": seconds_so_far, "initialisation": initialisation,
            "task": {"name": task.name, "labels": task.labels, "activation": task.activation,
                     "extra_outputs": task.extra_outputs},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "train_records": len(train_records), "train_sources": dict(Counter(r.source for r in train_records)),
            "data": config.extra.get("data", ""), "device": str(device), "hardware": describe_hardware(device),
        })
        if config.max_minutes is not None and time.time() - session_started > 60 * config.max_minutes:
            log.info("time budget of %.1f min spent after epoch %d", config.max_minutes, epoch + 1)
            break
    return out
