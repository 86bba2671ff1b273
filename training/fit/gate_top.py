"""Fine-tune the gate's top (denseblock4, norm5, classifier) on cached inputs, every picture at four turns.

The gate decides "X-ray or not" on the picture as sent and again once the orientation head has turned
it upright; the orientation head (gate card) reads the gate's own post-ReLU map. Training the whole
gate on turned films made it accept them but blurred what the head reads (docs/routing.md). Here only
the top trains, on the input of denseblock4 computed once per picture and turn by ONNX Runtime
(``training.fit.heads.FeatureCache``), so it can see far more draws in minutes on a CPU: the
orientation command's pictures (``training.card.orientation.choose_records``: every radiograph of the
smaller parts, a fixed sample of chest films and non-X-rays, the pack's real phone photos of films,
and every synthetic train photo given) at 0 / 90 / 180 / 270°. Two losses: the gate's cross-entropy
on upright X-rays and on non-X-rays at every turn (the gate's last word is on the picture the head has
turned upright, and a non-X-ray may be turned by the head or its search; ``--turned-films xray`` asks
it to accept turned films too), drawn evenly over the gate task's balance groups, and
the orientation head's own question (turned by 0 / 90 / 180 / 270°, or not an X-ray) asked of the
map by a linear layer started from the shipped head, so the map keeps telling the turns apart
(``--turn-loss``). The epoch kept has the lowest val loss (the two losses, each group and turn
weighing the same). The layer is used in training only: the card's orientation and modality heads
are fitted again afterwards on the new map, as ``training/train_pack.sh`` does after any gate.

    python -m training gate-top --model models/gate --manifest M --manifest SYNTHETIC/manifest.csv \\
        --out runs/gate_top

writes a run folder (``best.safetensors`` + ``state.json``) that ``python -m training export`` ships.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from diagnosis.network import load_model
from diagnosis.openset import load_arrays

from ..card.orientation import CLASSES, TURNS, choose_records
from ..data.datasets import Record, load_sources
from ..data.tasks import make_task
from .heads import FeatureCache, add_cache_arguments
from .part_top import add_top_arguments, fit_on_cache, run_provenance, top_config
from .top import Top, load_top, save_top, write_run

log = logging.getLogger(__name__)


class Passes:
    """Cached (record, turn) passes of one split with the gate's and the turn question's targets."""

    def __init__(self, cache: FeatureCache, records: list[Record], positive: int, turned_films: bool):
        task = make_task("gate", [])
        passes = [(r, False, turn) for r in records for turn in TURNS if cache.has(r, False, turn)]
        self.records = [r for r, _, _ in passes]
        self.turn = np.asarray([turn for _, _, turn in passes])
        self.middle = cache.rows(passes, "middle")
        self.xray = xray = np.asarray([r.is_xray for r in self.records])
        self.real_photo = np.asarray([r.phone_photo and not r.synthetic for r in self.records])
        self.gate = np.where(xray, positive, 1 - positive)
        # The gate's loss counts for upright X-rays and non-X-rays at every turn (``turned_films``: all).
        self.gate_counts = ~xray | (self.turn == 0) | turned_films
        self.turn_class = np.where(xray, [TURNS.index(t) for t in self.turn], CLASSES.index("not_xray"))
        self.group = np.asarray([f"{task.balance_group(r)}@{t}" for r, t in zip(self.records, self.turn, strict=True)])


class GateTop(torch.nn.Module):
    """The gate's top and, for training only, the orientation question on its unit-length flat map."""

    def __init__(self, network, turn_weight: np.ndarray, turn_bias: np.ndarray, dropout: float):
        super().__init__()
        self.top = Top(network, dropout)
        self.turn = torch.nn.Linear(turn_weight.shape[1], turn_weight.shape[0])
        with torch.no_grad():
            self.turn.weight.copy_(torch.from_numpy(turn_weight.astype(np.float32)))
            self.turn.bias.copy_(torch.from_numpy(turn_bias.astype(np.float32)))

    def forward(self, middle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.top.relu(self.top.block(middle))
        gate = self.top.classifier(self.top.dropout(maps.mean((2, 3))))
        flat = torch.nn.functional.normalize(maps.flatten(1), dim=1)
        return gate, self.turn(flat)


@torch.no_grad()
def outputs(model: GateTop, middle: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    gate, turn = zip(*(model(torch.from_numpy(middle[i:i + batch]).float()) for i in range(0, len(middle), batch)),
                     strict=True)
    return torch.softmax(torch.cat(gate), 1).numpy(), torch.softmax(torch.cat(turn), 1).numpy()


def validate(model: GateTop, val: Passes, positive: int, turn_loss: float) -> dict:
    gate, turn = outputs(model, val.middle)
    gate_loss = -np.log(gate[np.arange(len(gate)), val.gate] + 1e-12)
    turn_ce = -np.log(turn[np.arange(len(turn)), val.turn_class] + 1e-12)
    groups = sorted(set(val.group[val.gate_counts]))
    xray, photos, p = val.xray, val.real_photo, gate[:, positive]
    figures = {"loss": float(np.mean([gate_loss[(val.group == g) & val.gate_counts].mean() for g in groups])
                             + turn_loss * np.mean([turn_ce[val.turn_class == c].mean()
                                                    for c in sorted(set(val.turn_class))])),
               "turn_right": float((turn.argmax(1) == val.turn_class)[xray].mean())}
    for t in TURNS:  # at 0.5, a rough view: export chooses the threshold
        at = val.turn == t
        figures[f"films_accepted_{t}"] = float((p[at & xray & ~photos] >= 0.5).mean())
        figures[f"non_xrays_refused_{t}"] = float((p[at & ~xray] < 0.5).mean())
    figures["real_photos_accepted_upright"] = int((p[photos & (val.turn == 0)] >= 0.5).sum())
    return figures


def compare(shipped: GateTop, best: GateTop, val: Passes, positive: int, threshold: float) -> dict:
    """The best top beside the shipped one on the val passes, each at a threshold that lets the same
    number of val non-X-rays through (all turns together): the shipped gate at its card threshold,
    the new top at the one that accepts no more. Upright films and real photos accepted then, and
    the non-X-rays accepted per turn; a fair view of the trade-off, unlike any one fixed threshold."""
    xray, photos, upright = val.xray, val.real_photo, val.turn == 0
    before, after = outputs(shipped, val.middle)[0][:, positive], outputs(best, val.middle)[0][:, positive]
    through = int((before[~xray] >= threshold).sum())
    ranked = np.sort(after[~xray])[::-1]
    matched = float(np.nextafter(ranked[through], 1.0)) if through < len(ranked) else 0.0

    def at(p: np.ndarray, floor: float) -> dict:
        accepted = p >= floor
        films = accepted[upright & xray & ~photos]
        return {"threshold": round(floor, 4), "films_accepted_upright": round(float(films.mean()), 4),
                "real_photos_accepted_upright": int(accepted[upright & photos].sum()),
                "real_photos_upright": int((upright & photos).sum()),
                "non_xrays_accepted_per_turn": {t: int(accepted[(val.turn == t) & ~xray].sum()) for t in TURNS},
                "lowest_real_photo_probability": round(float(p[upright & photos].min()), 4) if photos.any() else None}

    return {"shipped": at(before, threshold), "best_same_non_xrays_through": at(after, matched)}


def train_gate_top(model: GateTop, train: Passes, val: Passes, positive: int, out: Path, *, epochs: int,
                   epoch_size: int, batch: int, lr: float, weight_decay: float, turn_loss: float, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)

    def step(rows: np.ndarray) -> torch.Tensor:
        gate, turn = model(torch.from_numpy(train.middle[rows]).float())
        counts = torch.from_numpy(train.gate_counts[rows]).float()
        gate_ce = torch.nn.functional.cross_entropy(gate, torch.from_numpy(train.gate[rows]), reduction="none")
        loss = (gate_ce * counts).sum() / counts.sum().clamp(min=1.0)
        return loss + turn_loss * torch.nn.functional.cross_entropy(turn, torch.from_numpy(train.turn_class[rows]))

    return fit_on_cache(model, list(train.group), step, lambda: validate(model, val, positive, turn_loss),
                        lambda: save_top(model.top, out / "best-top.safetensors"), epochs=epochs,
                        epoch_size=epoch_size, batch=batch, lr=lr, weight_decay=weight_decay, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training gate-top", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(parser)
    parser.set_defaults(model=Path("models/gate"), cache=Path(tempfile.gettempdir()) / "gate-features")
    add_top_arguments(parser, epochs=12)
    parser.add_argument("--turn-loss", type=float, default=1.0,
                        help="weight of the orientation question on the map (0: the gate's loss alone)")
    parser.add_argument("--turned-films", choices=("skip", "xray"), default="skip",
                        help="the gate's loss on X-rays turned by 90 / 180 / 270°: none, or 'X-ray'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    card, network = load_model(args.model)
    if card.orientation is None:
        raise SystemExit(f"{args.model} has no orientation head to start the turn question from")
    head = load_arrays(args.model, card.orientation.arrays)
    positive = card.labels.index(card.positive_label)
    chosen = [r for r in choose_records(load_sources(args.manifest), synthetic=True) if r.split in ("train", "val")]
    cache = FeatureCache(args.model, args.cache, threads=args.threads or 2)
    cache.extract([(r, False, turn) for r in chosen for turn in TURNS])
    turned = args.turned_films == "xray"
    train = Passes(cache, [r for r in chosen if r.split == "train"], positive, turned)
    val = Passes(cache, [r for r in chosen if r.split == "val"], positive, turned)
    log.info("train passes by group: %s", dict(Counter(g.split("@")[0] for g in train.group)))
    model = GateTop(copy.deepcopy(network), head["weight"], head["bias"], args.dropout)
    shipped = copy.deepcopy(model)
    state = train_gate_top(model, train, val, positive, args.out, epochs=args.epochs, epoch_size=args.epoch_size,
                           batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, turn_loss=args.turn_loss,
                           seed=args.seed)
    best = state["history"][state["best_epoch"]]
    load_top(model.top, args.out / "best-top.safetensors")
    state["comparison_val"] = compare(shipped, model, val, positive, card.threshold(card.positive_label))
    log.info("val, the same non-X-rays through: %s", json.dumps(state["comparison_val"]))
    used = Counter(r.source for r, t in zip(train.records, train.turn, strict=True) if t == 0)
    write_run(args.out, network, {
        "epoch": state["best_epoch"], "best": -best["loss"], "smoothed": -best["loss"],
        "history": state["history"], "comparison_val": state["comparison_val"],
        "train_seconds": round(state["seconds"] + cache.seconds),
        "initialisation": f"{args.model.name} of {card.version}; layers before denseblock4 frozen, "
                          "denseblock4 onwards + classifier fine-tuned on their cached inputs at four turns",
        "task": {"name": "gate", "labels": list(card.labels), "activation": "softmax", "extra_outputs": []},
        "config": {**top_config(card, args), "turn_loss": args.turn_loss, "turned_films": args.turned_films,
                   "balance": "even over the gate task's balance groups, each turn alike",
                   "selection": "lowest val loss: gate cross-entropy per group and turn (where it counts) + "
                                "turn_loss × the turn question's cross-entropy per class",
                   "augmentation": "every picture at 0 / 90 / 180 / 270° (cached passes)"},
        **run_provenance(args, used),
    })
    log.info("wrote %s: best epoch %d, val %s", args.out, state["best_epoch"], json.dumps(best))
    return 0
