"""Would refitting only the gate's final linear layer let more phone photos of films through? (issue #21)

    python -m training measure-gate-refit --model models/gate --manifest …/manifest.csv \
        --synthetic-train DIR/manifest.csv --synthetic-val DIR/manifest.csv [--cache DIR] [--json OUT]

The feature extractor stays frozen, so the orientation and modality heads (which read the gate's
feature map, never its classifier) are untouched. The pictures are the orientation command's
(``training.card.orientation.choose_records``: every radiograph of the smaller parts, 700 / 400 chest
films and 600 / 300 non-X-rays per train / val split, each at 0 / 90 / 180 / 270°) plus the pack's
real phone photos and the synthetic photos given (``python -m training synthetic-photos --negatives``),
pooled from the same spatial cache as the orientation command (``--cache``). Each variant starts from
the shipped layer (cross-entropy, classes and picture groups balanced, an L2 pull ``lam`` toward the
shipped weights) and is read at two thresholds: Youden's J on val as ``export`` chooses it, and the
lowest that refuses val non-X-rays at every turn at least as often as the shipped gate. Measures
only; writes no model.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.special import softmax

from diagnosis.cards import read_card
from diagnosis.openset import OrientationHead

from ..card.orientation import TURNS, choose_records, turned_view
from ..data.datasets import load_sources
from ..features import FeatureStore
from .metrics import youden_threshold

VARIANTS = [  # (negatives at which turns, weight of real train photos within X-rays, lam)
    dict(neg_turns=(0,), photo_weight=1.0, lam=1e-3),
    dict(neg_turns=TURNS, photo_weight=1.0, lam=1e-3),
    dict(neg_turns=TURNS, photo_weight=3.0, lam=1e-3),
    dict(neg_turns=TURNS, photo_weight=1.0, lam=1e-2),
    dict(neg_turns=TURNS, photo_weight=1.0, lam=1e-4),
]


def p_xray(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, positive: int) -> np.ndarray:
    return softmax(x @ weight.T + bias, axis=1)[:, positive]


def refusing(p: np.ndarray, share: float) -> float:
    """The lowest threshold under which at least ``share`` of the scores ``p`` fall."""
    if len(p) == 0:
        return 0.0
    need = int(np.ceil(share * len(p) - 1e-9))
    return 0.0 if need == 0 else float(np.nextafter(np.sort(p)[need - 1], 1.0))


def fit(x, y, w, w0, b0, lam, steps=200):
    weight, bias = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    xt, yt, st, w0t, b0t = (torch.tensor(a) for a in (x, y, w, w0, b0))
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(xt @ weight.T + bias, yt, reduction="none") * st).sum() / st.sum()
        loss = loss + lam * (((weight - w0t) ** 2).sum() + ((bias - b0t) ** 2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().numpy(), bias.detach().numpy()


def run(model: Path, manifest: list[str], synthetic_train: Path, synthetic_val: Path, cache: Path) -> dict:
    card = read_card(model)
    positive = card.labels.index(card.positive_label)
    chosen = choose_records(load_sources(manifest))
    store = FeatureStore(model, cache, spatial=True)
    _, maps = store.outputs([f"{r.path}#{t}" for r in chosen for t in TURNS], views=turned_view)
    pooled = maps.astype(np.float32).reshape(len(chosen), len(TURNS), 1024, -1).mean(-1)
    # The orientation head's own "not_xray" refusal (it reads the frozen map, so no refit changes it).
    head = OrientationHead(model, card.orientation) if card.orientation else None
    side = round(float(np.sqrt(maps.shape[1] // 1024)))
    ok = np.isfinite(pooled[:, 0, 0])
    photo_rows = [i for i, r in enumerate(chosen) if ok[i] and r.split == "val" and r.phone_photo]
    head_refused = np.zeros(len(photo_rows), bool)
    if head is not None and photo_rows:
        upright = maps[np.asarray(photo_rows) * len(TURNS)].astype(np.float32).reshape(-1, 1024, side, side)
        head_refused = head.not_xray(upright)[0]
    state = load_file(str(model / card.weights.file))
    w0 = state["classifier.weight"].float().numpy()
    b0 = state["classifier.bias"].float().numpy()

    def pick(split, kind, turn=0):
        m = [ok[i] and r.split == split and (
            (kind == "photo" and r.phone_photo) or (kind == "film" and r.is_xray and not r.phone_photo)
            or (kind == "neg" and not r.is_xray)) for i, r in enumerate(chosen)]
        return pooled[np.asarray(m), TURNS.index(turn)]

    def synthetic(path: Path):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        _, x = FeatureStore(model, cache).outputs([path.parent / r["path"] for r in rows])
        y = np.array([int(r["is_xray"] == "1") for r in rows])
        keep = np.isfinite(x[:, 0])
        return x[keep], y[keep]

    s_train, sy_train = synthetic(synthetic_train)
    s_val, sy_val = synthetic(synthetic_val)

    def measure(weight, bias, threshold):
        out = {}
        for turn in TURNS:
            out[f"non_xray_refused_{turn}"] = float((p_xray(weight, bias, pick("val", "neg", turn), positive)
                                                      < threshold).mean())  # unrounded: the bar of the variants
            out[f"films_accepted_{turn}"] = round(float((p_xray(weight, bias, pick("val", "film", turn), positive)
                                                          >= threshold).mean()), 4)
        photos = p_xray(weight, bias, pick("val", "photo"), positive)
        out["real_photos_accepted"] = f"{int((photos >= threshold).sum())}/{len(photos)}"
        both = int(((photos >= threshold) & ~head_refused).sum())
        out["real_photos_accepted_and_not_refused_by_head"] = f"{both}/{len(photos)}"
        out["real_photos_lowest_p"] = [round(float(p), 3) for p in np.sort(photos)[:2]]
        ps = p_xray(weight, bias, s_val, positive)
        out["synthetic_films_accepted"] = round(float((ps[sy_val == 1] >= threshold).mean()), 4)
        out["synthetic_non_xray_refused"] = round(float((ps[sy_val == 0] < threshold).mean()), 4)
        out["threshold"] = round(float(threshold), 4)
        return out

    shipped = measure(w0, b0, card.threshold(card.positive_label))
    report = {"real_photos_refused_by_orientation_head": f"{int(head_refused.sum())}/{len(head_refused)}",
              "n_val": {"films": len(pick("val", "film")), "non_xray": len(pick("val", "neg")),
                        "real_photos": len(pick("val", "photo")), "synthetic_films": int(sy_val.sum()),
                        "synthetic_non_xray": int((sy_val == 0).sum())},
              "shipped": shipped, "variants": []}
    val_x = np.concatenate([pick("val", "film"), pick("val", "photo"), pick("val", "neg")])
    val_y = np.r_[np.ones(len(pick("val", "film")) + len(pick("val", "photo"))), np.zeros(len(pick("val", "neg")))]
    for variant in VARIANTS:
        parts = [(pick("train", "neg", t), 0, 1.0) for t in variant["neg_turns"]]
        parts += [(pick("train", "film"), 1, 1.0), (pick("train", "photo"), 1, variant["photo_weight"]),
                  (s_train[sy_train == 1], 1, 1.0), (s_train[sy_train == 0], 0, 1.0)]
        x = np.concatenate([p for p, _, _ in parts]).astype(np.float32)
        y = np.concatenate([np.full(len(p), c) for p, c, _ in parts]).astype(np.int64)
        y = np.where(y == 1, positive, 1 - positive)
        w = np.concatenate([np.full(len(p), g / max(len(p), 1)) for p, _, g in parts]).astype(np.float32)
        for c in (0, 1):  # classes weigh the same
            w[y == c] /= w[y == c].sum()
        weight, bias = fit(x, y, w, w0, b0, variant["lam"])
        youden = youden_threshold(val_y.astype(int), p_xray(weight, bias, val_x, positive))
        safe = max(refusing(p_xray(weight, bias, pick("val", "neg", t), positive), shipped[f"non_xray_refused_{t}"])
                   for t in TURNS)
        report["variants"].append({"variant": {**variant, "neg_turns": list(variant["neg_turns"])},
                                   "train_pictures": len(y), "youden": measure(weight, bias, youden),
                                   "non_xray_kept": measure(weight, bias, safe)})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training measure-gate-refit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/gate"))
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--synthetic-train", type=Path, required=True, help="synthetic-photos manifest, train split")
    parser.add_argument("--synthetic-val", type=Path, required=True, help="synthetic-photos manifest, val split")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "orientation",
                        help="forward-pass cache (the orientation command's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = run(args.model, args.manifest, args.synthetic_train, args.synthetic_val, args.cache)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0
