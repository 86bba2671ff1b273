"""Fine-tune the body-part network's top (denseblock4, norm5, classifier) on cached inputs.

The body-part network saw about 14,000 balanced draws in its two whole-network stages (a few minutes
each on the CPU). Its top trains much longer here, on the output of transition3 computed once per
picture by ONNX Runtime (``training.fit.heads.FeatureCache``): train films of the six parts (chest
films capped by a hash of the file name), their mirror images (except chest: the heart is on one
side), the pack's real phone photos of films and synthetic phone photos of train films
(``python -m training synthetic-photos``), drawn evenly over the balance groups of the body-part task
(each part; real photos; synthetic photos). The epoch kept is the one with the lowest val loss
(cross-entropy over val films and real val photos, each part weighing the same): a confident, right
answer is what the unknown-part check and the chest floor need downstream.

    python -m training part-top --model models/body_part --manifest M --manifest SYNTHETIC/manifest.csv \\
        --out runs/body_part_top

writes a run folder (``best.safetensors`` + ``state.json``) that ``python -m training export`` ships;
the card's open-set check must then be fitted again (``python -m training open-set``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from diagnosis.network import load_model

from ..data.datasets import Record, by_file_name, load_sources
from ..data.tasks import Task
from .heads import FeatureCache, add_cache_arguments
from .top import Top, save_top, write_run
from .train import describe_hardware

log = logging.getLogger(__name__)


def choose_passes(records: list[Record], task: Task, chest_train: int) -> tuple[list, list]:
    """(record, mirrored) passes for train and val."""
    train = sorted((r for r in records if r.split == "train" and task.applies(r)), key=by_file_name)
    chest_films = [r for r in train if r.body_part == "chest" and not r.phone_photo][:chest_train]
    train = [r for r in train if r.body_part != "chest" or r.phone_photo] + chest_films
    passes = [(r, False) for r in train]
    passes += [(r, True) for r in train if not r.phone_photo and r.body_part != "chest"]
    val = [(r, False) for r in records if r.split == "val" and task.applies(r) and not r.synthetic]
    return passes, val


class Passes:
    def __init__(self, cache: FeatureCache, passes: list[tuple[Record, bool]], task: Task):
        passes = [p for p in passes if cache.has(*p)]
        self.records = [r for r, _ in passes]
        self.mirrored = [m for _, m in passes]
        self.middle = cache.rows(passes, "middle")
        self.target = np.asarray([task.target(r) for r in self.records])
        self.group = [task.balance_group(r) for r in self.records]


def validate(top: Top, val: Passes, labels: list[str]) -> dict:
    top.eval()
    with torch.no_grad():
        logits = torch.cat([top(torch.from_numpy(val.middle[i:i + 512]).float())
                            for i in range(0, len(val.middle), 512)])
    probs = torch.softmax(logits, 1).numpy()
    loss = -np.log(probs[np.arange(len(val.target)), val.target] + 1e-12)
    right = probs.argmax(1) == val.target
    parts = [c for c in range(len(labels)) if (val.target == c).any()]
    photos = np.asarray([r.phone_photo for r in val.records])
    return {"loss": float(np.mean([loss[val.target == c].mean() for c in parts])),
            "balanced_accuracy": float(np.mean([right[val.target == c].mean() for c in parts])),
            "real_photos_right": float(right[photos].mean()) if photos.any() else None,
            "below_min_confidence": int((probs.max(1) < 0.6).sum())}


def train_top(network, train: Passes, val: Passes, labels: list[str], out: Path, *, epochs: int,
              epoch_size: int, batch: int, lr: float, weight_decay: float, dropout: float, seed: int) -> dict:
    top = Top(network, dropout)
    out.mkdir(parents=True, exist_ok=True)

    def step(rows: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(top(torch.from_numpy(train.middle[rows]).float()),
                                                 torch.from_numpy(train.target[rows]))

    return fit_on_cache(top, train.group, step, lambda: validate(top, val, labels),
                        lambda: save_top(top, out / "best-top.safetensors"), epochs=epochs, epoch_size=epoch_size,
                        batch=batch, lr=lr, weight_decay=weight_decay, seed=seed)


def fit_on_cache(module: torch.nn.Module, groups: list[str], step, check, save, *, epochs: int, epoch_size: int,
                 batch: int, lr: float, weight_decay: float, seed: int) -> dict:
    """AdamW on ``module`` over cached rows (shared with ``training.fit.gate_top``): each epoch draws
    ``epoch_size`` rows evenly over their balance ``groups`` and steps on ``step(rows)``, the batch's
    loss; ``check()`` gives the val figures ("loss" among them) and ``save()`` keeps the module whenever
    that loss is the lowest so far (epoch 0: as it started)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    counts = Counter(groups)
    weights = torch.as_tensor([1.0 / counts[g] for g in groups])
    figures = check()
    state = {"history": [{"epoch": 0, **rounded_figures(figures)}], "best": figures["loss"], "best_epoch": 0,
             "seconds": 0.0}
    save()
    log.info("epoch 0 (as shipped): %s", json.dumps(rounded_figures(figures)))
    generator = torch.Generator()
    for epoch in range(1, epochs + 1):
        clock = time.time()
        generator.manual_seed(seed + epoch)
        drawn = torch.multinomial(weights, epoch_size, replacement=True, generator=generator).numpy()
        module.train()
        losses = []
        for begin in range(0, epoch_size, batch):
            loss = step(np.sort(drawn[begin:begin + batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        close_epoch(state, epoch, losses, check(), clock, save)
    return state


def close_epoch(state: dict, epoch: int, losses: list[float], figures: dict, started: float, save) -> None:
    """One epoch's row in ``state["history"]``; ``save()`` keeps the module when its val loss is the
    lowest so far."""
    row = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 4), **rounded_figures(figures),
           "seconds": round(time.time() - started, 1)}
    state["history"].append(row)
    state["seconds"] += time.time() - started
    if figures["loss"] < state["best"]:
        state.update(best=figures["loss"], best_epoch=epoch)
        save()
    log.info("%s", json.dumps(row))


def rounded_figures(figures: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def top_config(card, args: argparse.Namespace) -> dict:
    """The run's settings that every top trained on cached inputs records (``add_top_arguments``)."""
    return {"size": card.input.size, "mean": card.input.mean, "std": card.input.std, "optimizer": "adamw",
            "lr": args.lr, "schedule": "constant", "weight_decay": args.weight_decay, "dropout": args.dropout,
            "batch_size": args.batch, "epoch_size": args.epoch_size, "epochs": args.epochs, "seed": args.seed,
            "fine_tuned": "denseblock4 onwards + classifier (frozen below, inputs cached)",
            "recipe_of_the_backbone": card.training.get("recipe")}


def run_provenance(args: argparse.Namespace, used: Counter) -> dict:
    """Where the run's data came from and what it ran on, for its state.json (and so the card)."""
    return {"train_records": sum(used.values()), "train_sources": dict(used),
            "data": "xray-pack " + " + ".join(Path(m).name for m in args.manifest) + "; train split, val for the epoch",
            "hardware": f"2-core CPU ({describe_hardware(torch.device('cpu'))}); cached inputs by ONNX Runtime"}


def add_top_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The run folder and optimiser settings of a top trained on cached inputs (part-top, gate-top)."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--epoch-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training part-top", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(parser)
    parser.set_defaults(model=Path("models/body_part"), cache=Path(tempfile.gettempdir()) / "body-part-features")
    add_top_arguments(parser, epochs=8)
    parser.add_argument("--chest-train", type=int, default=1500, help="train chest films (by a hash of the name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    card, network = load_model(args.model)
    task = Task("body_part", list(card.labels), "softmax")
    train_passes, val_passes = choose_passes(load_sources(args.manifest), task, args.chest_train)
    cache = FeatureCache(args.model, args.cache, threads=args.threads or 2)
    cache.extract(train_passes + val_passes)
    train, val = Passes(cache, train_passes, task), Passes(cache, val_passes, task)
    log.info("train passes by group: %s", dict(Counter(train.group)))
    state = train_top(copy.deepcopy(network), train, val, card.labels, args.out, epochs=args.epochs,
                      epoch_size=args.epoch_size, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                      dropout=args.dropout, seed=args.seed)
    best = state["history"][state["best_epoch"]]
    used = Counter(r.source for r, mirrored in zip(train.records, train.mirrored, strict=True) if not mirrored)
    write_run(args.out, network, {
        "epoch": state["best_epoch"], "best": best["balanced_accuracy"], "smoothed": best["balanced_accuracy"],
        "history": state["history"], "train_seconds": round(state["seconds"] + cache.seconds),
        "initialisation": f"{args.model.name} of {card.version}; layers before denseblock4 frozen, "
                          "denseblock4 onwards + classifier fine-tuned on their cached inputs",
        "task": {"name": "body_part", "labels": list(card.labels), "activation": "softmax", "extra_outputs": []},
        "config": {**top_config(card, args), "chest_train": args.chest_train,
                   "balance": "even over the body-part task's balance groups",
                   "selection": "lowest val cross-entropy, each part weighing the same",
                   "augmentation": "mirror images of the non-chest train films (cached passes)"},
        **run_provenance(args, used),
    })
    log.info("wrote %s: best epoch %d, val %s", args.out, state["best_epoch"], json.dumps(best))
    return 0
