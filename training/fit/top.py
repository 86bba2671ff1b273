"""Fine-tune the chest network's top (denseblock4, norm5, classifier) on cached inputs.

At 128 px the last dense block sees a 4 × 4 map: about 3 % of the network's compute but 30 % of its
weights. Its input (the output of transition3) is computed once per film and mirror image by
``python -m training heads --extract-only --mirror-train`` and cached; the top then trains for many
epochs on every chest film of the pack in minutes on a CPU, with masked BCE over the 14 findings and
the ``abnormal`` output (unknown labels give no loss) and sources weighted by share, so that the
normal-only and COVID-only sources cannot dominate. The epoch kept is the one with the best NIH val
mean AUC over the 15 outputs (mirror-averaged, as the service runs).

    python -m training top --model models/chest --manifest M --manifest M_EXTRA --out runs/chest_top

writes a run folder (``best.safetensors`` + ``state.json``) that ``python -m training export`` ships;
re-running with the same ``--out`` resumes from ``last.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections import Counter, OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diagnosis.network import load_model

from ..data.datasets import CHEST_LABELS, NIH_SOURCES, Record, load_sources
from ..data.tasks import Task
from ..runtime import masked_bce
from .heads import TOPS, FeatureCache, add_cache_arguments, describe, parse_shares
from .train import describe_hardware

log = logging.getLogger(__name__)

TASK = Task("chest", list(CHEST_LABELS), "sigmoid", ["abnormal"])


class Top(torch.nn.Module):
    """Cached input → logits: the network's own blocks from ``top`` on, final ReLU, pooling and classifier."""

    def __init__(self, network, dropout: float, top: str = "denseblock4"):
        super().__init__()
        self.block = torch.nn.Sequential(OrderedDict(list(network.features.named_children())[TOPS[top]:]))
        self.relu, self.classifier = network.relu, network.classifier
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, middle: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.relu(self.block(middle)).mean((2, 3))))


class Examples:
    """Cached passes of one split: rows of ``middle`` with their record, mirror flag and target."""

    def __init__(self, cache: FeatureCache, records: list[Record], mirrors: bool):
        pairs = [(r, m) for r in records for m in ((False, True) if mirrors else (False,)) if cache.has(r, m)]
        self.records = [r for r, _ in pairs]
        self.mirrored = np.asarray([m for _, m in pairs])
        self.middle = cache.rows(pairs, "middle") if pairs else np.zeros(0)
        self.targets = np.stack([TASK.target(r) for r in self.records])
        self.sources = np.asarray([r.source for r in self.records])


def sampling_weights(examples: Examples, shares: dict[str, float]) -> np.ndarray:
    """Each source draws ``shares[source]`` of every epoch (0 or absent: never), evenly over its passes."""
    counts = Counter(examples.sources)
    total = sum(shares.get(s, 0.0) for s in counts)
    return np.asarray([shares.get(s, 0.0) / total / counts[s] for s in examples.sources])


@torch.no_grad()
def logits_of(top: Top, middle: np.ndarray, batch: int = 512) -> np.ndarray:
    top.eval()
    return np.concatenate([top(torch.from_numpy(middle[i:i + batch]).float()).numpy()
                           for i in range(0, len(middle), batch)])


def validate(top: Top, val: Examples) -> dict:
    """NIH figures on mirror-averaged logits (the service averages the logits of a film and its
    mirror image); films of other sources have one pass and only count in the all-sources AUC."""
    logits = logits_of(top, val.middle)
    keys = [str(r.path) for r in val.records]
    plain = {k: i for i, (k, m) in enumerate(zip(keys, val.mirrored, strict=True)) if not m}
    mirror = {k: i for i, (k, m) in enumerate(zip(keys, val.mirrored, strict=True)) if m}
    order = list(plain)
    averaged = np.stack([(logits[plain[k]] + logits[mirror[k]]) / 2 if k in mirror else logits[plain[k]]
                         for k in order])
    films = SimpleNamespace(targets=np.stack([val.targets[plain[k]] for k in order]),  # what describe reads
                            nih=np.isin([val.sources[plain[k]] for k in order], NIH_SOURCES))
    figures = describe(films, averaged)
    single = describe(films, np.stack([logits[plain[k]] for k in order]))  # is mirror averaging still worth it?
    figures.update(mean_auc_no_mirror=single["mean_auc"], abnormal_auc_no_mirror=single["abnormal_auc"])
    labels = len(CHEST_LABELS)
    figures["mean_auc_15"] = (figures["mean_auc"] * labels + figures["abnormal_auc"]) / (labels + 1)
    return figures


def train_top(network, train: Examples, val: Examples, shares: dict[str, float], out: Path, *, epochs: int,
              epoch_size: int, batch: int, lr: float, weight_decay: float, dropout: float, patience: int,
              seed: int, max_minutes: float | None, top_from: str = "denseblock4", cosine: bool = False) -> dict:
    top = Top(network, dropout, top_from)
    optimizer = torch.optim.AdamW(top.parameters(), lr=lr, weight_decay=weight_decay)
    state = {"epoch": 0, "history": [], "best": None, "best_epoch": 0, "seconds": 0.0}
    if (out / "last.safetensors").is_file():  # resume (AdamW's moments start afresh: they are not saved)
        saved = load_file(str(out / "last.safetensors"))
        top.load_state_dict({k[len("top."):]: v for k, v in saved.items() if k.startswith("top.")})
        state = json.loads((out / "progress.json").read_text())
        log.info("resuming after epoch %d", state["epoch"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        figures = validate(top, val)
        state.update(best=figures["mean_auc_15"], history=[{"epoch": 0, **_short(figures)}])
        save_top(top, out / "best-top.safetensors")
        log.info("epoch 0 (as shipped): %s", _short(figures))
    steps_per_epoch = -(-epoch_size // batch)
    # Cosine decay to 0 over ``epochs`` (the top overfits within an epoch or two at a constant rate).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + np.cos(
        np.pi * min(1.0, step / (epochs * steps_per_epoch))))) if cosine else None
    for _ in range(state["epoch"] * steps_per_epoch if schedule else 0):  # a resumed run continues the decay
        schedule.step()
    weights = torch.as_tensor(sampling_weights(train, shares))
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    while state["epoch"] < epochs and state["epoch"] - state["best_epoch"] < patience:
        if max_minutes is not None and time.time() - started > max_minutes * 60:
            log.info("stopping after %.0f min (--max-minutes); re-run to resume", (time.time() - started) / 60)
            break
        clock = time.time()
        generator.manual_seed(seed + state["epoch"])  # a resumed run draws what an unbroken one would
        drawn = torch.multinomial(weights, epoch_size, replacement=True, generator=generator).numpy()
        top.train()
        losses = []
        for begin in range(0, epoch_size, batch):
            rows = np.sort(drawn[begin:begin + batch])
            loss = masked_bce(top(torch.from_numpy(train.middle[rows]).float()), torch.from_numpy(train.targets[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule:
                schedule.step()
            losses.append(loss.item())
        state["epoch"] += 1
        figures = validate(top, val)
        row = {"epoch": state["epoch"], "loss": round(float(np.mean(losses)), 4), **_short(figures),
               "seconds": round(time.time() - clock, 1)}
        state["history"].append(row)
        state["seconds"] += time.time() - clock
        if figures["mean_auc_15"] > state["best"]:
            state.update(best=figures["mean_auc_15"], best_epoch=state["epoch"])
            save_top(top, out / "best-top.safetensors")
        save_top(top, out / "last.safetensors")
        (out / "progress.json").write_text(json.dumps(state, indent=1))
        log.info("%s", json.dumps(row))
    return state


def save_top(top: Top, path: Path) -> None:
    save_file({f"top.{k}": v.contiguous() for k, v in top.state_dict().items()}, str(path))


def _short(figures: dict) -> dict:
    return {k: round(v, 4) for k, v in figures.items() if k != "auc" and v is not None}


def load_top(top: Top, path: Path) -> None:
    """The weights ``save_top`` wrote, into ``top`` (and so into the network it shares modules with)."""
    top.load_state_dict({k[len("top."):]: v for k, v in load_file(str(path)).items()})


def write_run(out: Path, network, meta: dict, top_from: str = "denseblock4") -> None:
    """A run folder as ``train`` writes it: the whole network with the best top."""
    load_top(Top(network, 0.0, top_from), out / "best-top.safetensors")  # shares modules with ``network``
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(out / "best.safetensors"))
    (out / "state.json").write_text(json.dumps(meta, indent=1))


def make_soup(runs: list[Path], network, val: Examples, out: Path, top_from: str) -> dict:
    """Average the best tops of several runs from the same start (a "model soup", Wortsman et al.
    2022): one network, no extra inference cost, and less of one run's luck on a noisy val split."""
    tops = [load_file(str(run / "best-top.safetensors")) for run in runs]
    soup = {k: sum(t[k].float() for t in tops) / len(tops) if tops[0][k].is_floating_point() else tops[0][k]
            for k in tops[0]}
    top = Top(network, 0.0, top_from)
    top.load_state_dict({k[len("top."):]: v for k, v in soup.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_top(top, out / "best-top.safetensors")
    return _short(validate(top, val))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training top", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shares", type=parse_shares,
                        default=parse_shares("nih_cxr14=1,nih_extra=0.2,rsna_normal=0.3,covid_radiography=0.15,"
                                             "cxr_normal_paediatric=0.05"),
                        help="source=share of each epoch's draws (val-chosen)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--epoch-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--cosine", action="store_true", help="learning rate decays to 0 over --epochs")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--patience", type=int, default=6, help="epochs without a better val score before stopping")
    parser.add_argument("--top", choices=list(TOPS), default="denseblock4",
                        help="train from this block on (its inputs cached by python -m training heads --top)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--soup", type=Path, action="append", default=[],
                        help="a finished run of the same --top (repeat): ship the average of their best tops")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    records = [r for r in load_sources(args.manifest) if TASK.applies(r)]
    cache = FeatureCache(args.model, args.cache, threads=args.threads or 2, top=args.top)
    card, network = load_model(args.model)
    if list(card.outputs) != TASK.outputs:
        raise SystemExit(f"{args.model} has outputs {card.outputs}; the top trains {TASK.outputs}")
    train = Examples(cache, [r for r in records if r.split == "train"], mirrors=True)
    val = Examples(cache, [r for r in records if r.split == "val"], mirrors=True)
    if not len(train.records) or not len(val.records):
        raise SystemExit("no cached passes: run python -m training heads --extract-only --mirror-train first")
    log.info("train passes: %s", dict(Counter(train.sources)))
    log.info("val passes: %s", dict(Counter(val.sources)))
    if args.soup:
        return ship_soup(args, card, network, train, val, cache)
    state = train_top(copy.deepcopy(network), train, val, args.shares, args.out, epochs=args.epochs,
                      epoch_size=args.epoch_size, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                      dropout=args.dropout, patience=args.patience, seed=args.seed, max_minutes=args.max_minutes,
                      top_from=args.top, cosine=args.cosine)
    best = state["history"][state["best_epoch"]]
    used = Counter(r.source for r, m in zip(train.records, train.mirrored, strict=True)
                   if not m and args.shares.get(r.source, 0) > 0)
    for entry in card.data_sources:  # what the frozen part was trained on stays on the record
        used[entry["source"]] = max(used[entry["source"]], entry.get("train_images", 0))
    write_run(args.out, network, {
        "epoch": state["best_epoch"], "best": best["mean_auc"], "smoothed": best["mean_auc"],
        "history": state["history"], "train_seconds": round(state["seconds"] + cache.seconds),
        "initialisation": f"{args.model.name} of {card.version}; layers before {args.top} frozen, "
                          f"{args.top} onwards + classifier fine-tuned on their cached inputs",
        "task": {"name": "chest", "labels": list(CHEST_LABELS), "activation": "sigmoid", "extra_outputs": ["abnormal"]},
        "config": {"size": card.input.size, "mean": card.input.mean, "std": card.input.std, "optimizer": "adamw",
                   "lr": args.lr,
                   "schedule": "cosine to 0" if args.cosine else "constant", "weight_decay": args.weight_decay,
                   "dropout": args.dropout, "batch_size": args.batch,
                   "epoch_size": args.epoch_size, "epochs": args.epochs, "seed": args.seed,
                   "group_shares": args.shares, "selection": "NIH val mean AUC over the 14 findings + abnormal",
                   "augmentation": "mirror images of the NIH train films (cached passes)",
                   "fine_tuned": f"{args.top} onwards + classifier (frozen below, inputs cached)",
                   "recipe_of_the_backbone": card.training.get("recipe")},
        "train_records": sum(used.values()), "train_sources": dict(used),
        "data": "xray-pack " + " + ".join(Path(m).name for m in args.manifest)
                + f"; every cached train pass, drawn by source shares {args.shares}",
        "hardware": f"2-core CPU ({describe_hardware(torch.device('cpu'))}); cached inputs by ONNX Runtime",
    }, args.top)
    log.info("wrote %s: best epoch %d, val %s", args.out, state["best_epoch"], json.dumps(best))
    return 0


def ship_soup(args, card, network, train: Examples, val: Examples, cache: FeatureCache) -> int:
    figures = make_soup(args.soup, copy.deepcopy(network), val, args.out, args.top)
    ingredients = [{"run": run.name, **json.loads((run / "state.json").read_text())} for run in args.soup]
    history = [{"ingredient": i["run"], **i["history"][i["epoch"]]} for i in ingredients]
    history.append({"epoch": 1, "soup": [i["run"] for i in ingredients], **figures})
    first = ingredients[0]
    write_run(args.out, network, {
        **{k: first[k] for k in ("task", "train_records", "train_sources", "data", "hardware")},
        "epoch": 1, "best": figures["mean_auc"], "smoothed": figures["mean_auc"], "history": history,
        "train_seconds": sum(i["train_seconds"] for i in ingredients) - (len(ingredients) - 1) * round(cache.seconds),
        "initialisation": first["initialisation"] + "; the average of the best tops of "
                          + ", ".join(f"{i['run']} (epoch {i['epoch']})" for i in ingredients),
        "config": {**first["config"], "soup": {i["run"]: {k: i["config"].get(k) for k in (
            "lr", "schedule", "dropout", "epoch_size", "seed")} for i in ingredients}},
    }, args.top)
    log.info("wrote %s: soup of %d runs, val %s", args.out, len(ingredients), json.dumps(figures))
    return 0
