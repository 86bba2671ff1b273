"""Which 8 × 8 heatmap to ship (issue #22): candidate maps scored on the pack's radiologist boxes.

    python -m bench.heatmap_candidates --pack ../shared/data/xray-pack --cache /tmp/hm8 [--extract]

An offline comparison (torch, the chest model of ``models/chest``), used to choose the map that
``python -m training heatmap-baseline`` fits and ``python -m training measure-heatmaps`` then
measures through the service. Every film is read as the service reads it (intake, photo step, the
card's preprocessing); unlike the service, the films the gate or body-part model would not pass to
the chest model are scored here too, so the figures are slightly higher than the pipeline's.
Scoring is bench.heatmaps': the hottest red point inside the box (no margin), and the median
share ratio. Every map is relative to its own mean over the 969 normal NIH val films and divided
by the 99th percentile of |excess| there (clipped to [-1, 1], as drawn):

* ``4x4``: ``W_c · A`` on the final map (the map shipped before);
* ``gxa``: gradient × activation of the logit at block 3 (``transition3.conv``, equal to the same at
  ``transition3.relu``: the 1 × 1 convolution is linear); also unclipped (peak before clipping);
* ``ig``: integrated gradients at block 3 from the mean normal block-3 map (8 steps);
* ``lr_*``: per-finding logistic regression on pooled block-3 features (``tr``: transition3.relu,
  ``tc``: transition3.conv) fitted on the NIH train split's labels, drawn as its exact 8 × 8 CAM;
* ``shift``: the 4 × 4 map of the film shifted by ±8 px in x and y (4 passes), interleaved to 8 × 8;
* combinations of the above.

``--extract`` computes the features into ``--cache`` (never the repository; ~40 min on 2 busy cores);
without it the cached ones are read. Safetensors only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from bench.heatmaps import box_share_ratio, inside
from diagnosis.heatmap import hottest_red_point, upsampled
from diagnosis.network import load_model
from diagnosis.preprocess import to_model_input
from training.card.heatmap_baseline import normal_val_films
from training.features import service_view

SHIFT = 8


def block_maps(network, x: torch.Tensor) -> dict[str, np.ndarray]:
    f = network.features
    with torch.inference_mode():
        block3, final = network.forward_block3(x)
        conv = f.transition3.conv(block3)
    return {"tr": block3.numpy(), "tc": conv.numpy(), "a": final.numpy()}


def extract(network, card, paths: list[Path], out: Path, pooled: bool = False, labels=None) -> None:
    res: dict[str, list] = {}
    for start in range(0, len(paths), 64):
        views = [service_view(p) for p in paths[start:start + 64]]
        x = torch.from_numpy(np.stack([to_model_input(v, card.input.size, card.input.mean, card.input.std)
                                       for v in views]))
        maps = block_maps(network, x)
        if pooled:
            maps = {k: v.mean(axis=(2, 3)) for k, v in maps.items() if k != "a"}
        for k, v in maps.items():
            res.setdefault(k, []).append(v.astype(np.float16 if not pooled and k != "a" else np.float32))
        print(out.name, start + len(views), flush=True)
    arrays = {k: np.concatenate(v) for k, v in res.items()}
    if labels is not None:
        arrays["y"] = labels
    save_file(arrays, str(out))


def shifted_maps(network, card, paths: list[Path], out: Path) -> None:
    weights = network.classifier.weight.detach()[:len(card.labels)]
    maps = []
    for path in paths:
        x = to_model_input(service_view(path), card.input.size, card.input.mean, card.input.std)
        pad = np.pad(x, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT)), mode="edge")
        size = card.input.size
        batch = np.stack([pad[:, SHIFT - dy:SHIFT - dy + size, SHIFT - dx:SHIFT - dx + size]
                          for dy in (SHIFT, -SHIFT) for dx in (SHIFT, -SHIFT)])
        with torch.inference_mode():
            a = network.forward_features(torch.from_numpy(np.ascontiguousarray(batch)))
            s = torch.einsum("ck,nkhw->nchw", weights, a).numpy()
        m = np.zeros((len(card.labels), 2 * s.shape[2], 2 * s.shape[3]), np.float32)
        for k, (oy, ox) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            m[:, oy::2, ox::2] = s[k]
        maps.append(m)
    save_file({"s": np.stack(maps)}, str(out))


def gradient_x_activation(network, conv: np.ndarray, labels: int, steps: int = 1,
                          base: np.ndarray | None = None) -> np.ndarray:
    f = network.features

    def tail(t):
        return network.head(network.relu(f.norm5(f.denseblock4(f.transition3.pool(t)))))[:, :labels]

    out = np.zeros((len(conv), labels, *conv.shape[2:]), np.float32)
    for start in range(0, len(conv), 32):
        x = torch.from_numpy(conv[start:start + 32].astype(np.float32))
        b = torch.zeros_like(x) if base is None else torch.from_numpy(base.astype(np.float32))[None].expand_as(x)
        total = torch.zeros(len(x), labels, *x.shape[1:])
        alphas = (np.arange(steps) + 0.5) / steps if steps > 1 else [1.0]
        for alpha in alphas:
            xi = (b + float(alpha) * (x - b)).detach().requires_grad_(True)
            z = tail(xi)
            for c in range(labels):
                (g,) = torch.autograd.grad(z[:, c].sum(), xi, retain_graph=c < labels - 1)
                total[:, c] += g / len(alphas)
        out[start:start + 32] = ((x - b)[:, None] * total).sum(2).detach().numpy()
    return out


def relative(film_maps: np.ndarray, normal_maps: np.ndarray, clip: bool = True, percentile: float = 99):
    mean = normal_maps.mean(0)
    excess = np.abs(normal_maps - mean).transpose(1, 0, 2, 3).reshape(normal_maps.shape[1], -1)
    scale = np.percentile(excess, percentile, axis=1)
    if clip:
        return lambda k, c: np.clip((film_maps[k, c] - mean[c]) / scale[c], -1, 1)
    return lambda k, c: (film_maps[k, c] - mean[c]) / scale[c]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heatmap_candidates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="feature cache (not the repository)")
    parser.add_argument("--model", type=Path, default=Path("models/chest"))
    parser.add_argument("--extract", action="store_true", help="compute the cached features first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    card, network = load_model(args.model, "cpu")
    network.eval()
    labels = card.labels
    cache, pack = args.cache, args.pack
    box_rows = list(csv.DictReader((pack / "nih-bboxes.csv").open(encoding="utf-8")))
    box_paths = sorted({r["path"] for r in box_rows})
    normals = normal_val_films([pack / "manifest.csv", pack / "manifest-extra.csv"], labels)
    if args.extract:
        cache.mkdir(parents=True, exist_ok=True)
        extract(network, card, [pack / p for p in box_paths], cache / "boxes.safetensors")
        extract(network, card, normals, cache / "normal.safetensors")
        train = [r for r in csv.DictReader((pack / "manifest.csv").open(encoding="utf-8"))
                 if r["split"] == "train" and r["source"] == "nih_cxr14"]
        extract(network, card, [pack / r["path"] for r in train], cache / "train_0.safetensors", pooled=True,
                labels=np.array([[float(r[label]) for label in labels] for r in train], np.float32))
        shifted_maps(network, card, [pack / p for p in box_paths], cache / "shift_boxes.safetensors")
        shifted_maps(network, card, normals[::3], cache / "shift_normal.safetensors")

    def floats(path: Path) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}

    boxes, normal, train = (floats(cache / f"{n}.safetensors") for n in ("boxes", "normal", "train_0"))
    where = {p: k for k, p in enumerate(box_paths)}
    results: dict[str, dict] = {}

    def score(name: str, map_of) -> None:
        hits, ratios = [], []
        for row in box_rows:
            box = tuple(float(row[k]) for k in "xywh")
            heat = map_of(where[row["path"]], labels.index(row["label"]))
            point = hottest_red_point(heat, card.input.size, card.input.size)
            point = None if point is None else [int(np.floor(point[0])), int(np.floor(point[1]))]
            hits.append(inside(point, box))
            ratios.append(box_share_ratio(upsampled(np.clip(heat, -1, 1), card.input.size, card.input.size), box))
        results[name] = {"pointing": round(float(np.mean(hits)), 3), "hits": int(np.sum(hits)),
                         "median_share_ratio": round(float(np.median(ratios)), 2)}
        print(f"{name:44s} pointing {np.mean(hits):.3f} ({sum(hits)}/{len(hits)})  share {np.median(ratios):.2f}",
              flush=True)

    weights = network.classifier.weight.detach().numpy()[:len(labels)]

    def cam(maps, w):
        return np.einsum("ck,nkhw->nchw", w, maps)

    final_b, final_n = cam(boxes["a"], weights), cam(normal["a"], weights)
    score("4x4: W·A − normal mean (shipped before)", relative(final_b, final_n))
    score("4x4, peak before clipping", relative(final_b, final_n, clip=False))
    gxa_b, gxa_n = (gradient_x_activation(network, m["tc"], len(labels)) for m in (boxes, normal))
    score("gxa: block-3 gradient × activation − normal mean", relative(gxa_b, gxa_n))
    score("gxa, peak before clipping (shipped)", relative(gxa_b, gxa_n, clip=False))
    base = normal["tc"].mean(0)
    ig_b, ig_n = (gradient_x_activation(network, m["tc"], len(labels), 8, base) for m in (boxes, normal))
    score("ig: integrated gradients from the normal mean", relative(ig_b, ig_n))
    from sklearn.linear_model import LogisticRegression
    for layer in ("tr", "tc"):
        x = train[layer]
        mu, sd = x.mean(0), x.std(0) + 1e-6
        for c_value in (0.01, 0.1, 1.0):
            probe = np.zeros((len(labels), x.shape[1]), np.float32)
            for c in range(len(labels)):
                if train["y"][:, c].sum() >= 2:
                    model = LogisticRegression(C=c_value, max_iter=2000).fit((x - mu) / sd, train["y"][:, c])
                    probe[c] = model.coef_[0] / sd
            score(f"lr_{layer} C={c_value}: probe CAM − normal mean",
                  relative(cam(boxes[layer], probe), cam(normal[layer], probe)))
    shift_b, shift_n = (load_file(str(cache / f"shift_{n}.safetensors"))["s"] for n in ("boxes", "normal"))
    score("shift: 4 shifted 4x4 passes interleaved", relative(shift_b, shift_n))
    four, fine, shift = relative(final_b, final_n), relative(gxa_b, gxa_n), relative(shift_b, shift_n)

    def up(m):
        return cv2.resize(m.astype(np.float32), fine(0, 0).shape[::-1], interpolation=cv2.INTER_LINEAR)

    score("(4x4 upsampled + gxa) / 2", lambda k, c: 0.5 * (up(four(k, c)) + fine(k, c)))
    score("(shift + gxa) / 2", lambda k, c: 0.5 * (shift(k, c) + fine(k, c)))
    report = {"command": "python -m bench.heatmap_candidates " + " ".join(argv if argv is not None else sys.argv[1:]),
              "boxes": len(box_rows), "normal_films": len(normals), "maps": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
