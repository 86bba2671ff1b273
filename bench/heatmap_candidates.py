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

``--fine`` (issue #22, second round) scores instead the block-2 and fusion candidates, from one forward
pass and one backward pass per finding through the tail from block 2 (``extract_fine``):

* ``gxa2``: gradient × activation at block 2 (``transition2.relu``, before its pool: 512 channels,
  16 × 16 at 128 px); ``lc2``/``lc3``: LayerCAM, ReLU(gradient) × activation, at block 2 and 3;
* fusions of the block-3 map (upsampled to 16 × 16) with the block-2 map (weighted sums, product,
  geometric mean); Gaussian smoothing before the peak; the peak as the centroid of the top red
  region; a per-cell standardisation ((M − mean) / std over the normal films); the colour scale's
  percentile and a dead zone around 0; paired bootstrap intervals against the shipped map;
* a per-finding spatial prior: the mean relative block-3 map of ``PRIOR_FILMS`` NIH train films
  with the finding (the box films left out): where the finding usually is, not this film's evidence.

``--extract`` computes the features into ``--cache`` (never the repository; ~40 min on 2 busy cores;
with ``--fine`` ~10 min); without it the cached ones are read. Safetensors only.
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


def block2_input(network, x: torch.Tensor) -> torch.Tensor:
    """The block-2 map: the output of ``features.transition2.relu`` (before its 1 × 1 convolution and
    pool; 512 channels, 16 × 16 at 128 px)."""
    h = x
    for name, module in network.features.named_children():
        if name == "transition2":
            break
        h = module(h)
    transition = network.features.transition2
    return transition.relu(transition.norm(h))


def extract_fine(network, card, paths: list[Path], out: Path) -> None:
    """Per film and finding: gradient × activation (``gxa``) and LayerCAM's ReLU(gradient) × activation
    (``lc``) at block 2 (16 × 16) and block 3 (8 × 8), from one forward pass and one backward pass per
    finding through the tail; and the logits."""
    labels = len(card.labels)
    f = network.features
    res: dict[str, list] = {}
    for start in range(0, len(paths), 16):
        views = [service_view(p) for p in paths[start:start + 16]]
        x = torch.from_numpy(np.stack([to_model_input(v, card.input.size, card.input.mean, card.input.std)
                                       for v in views]))
        with torch.no_grad():
            b2 = block2_input(network, x)
        b2.requires_grad_(True)
        b3 = f.transition3.relu(f.transition3.norm(f.denseblock3(f.transition2.pool(f.transition2.conv(b2)))))
        z = network.logits_from_block3(b3)[:, :labels]
        maps: dict[str, list] = {k: [] for k in ("gxa2", "lc2", "gxa3", "lc3")}
        for c in range(labels):
            g2, g3 = torch.autograd.grad(z[:, c].sum(), [b2, b3], retain_graph=c < labels - 1)
            for name, g, a in (("2", g2, b2), ("3", g3, b3)):
                maps["gxa" + name].append((g * a).sum(1).detach())
                maps["lc" + name].append((g.clamp(min=0) * a).sum(1).detach())
        for k, v in maps.items():
            res.setdefault(k, []).append(torch.stack(v, 1).numpy())
        res.setdefault("logits", []).append(z.detach().numpy())
        print(out.name, start + len(views), flush=True)
    save_file({k: np.concatenate(v).astype(np.float32) for k, v in res.items()}, str(out))


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


def scorer(box_rows: list[dict], where: dict[str, int], labels: list[str], size: int, results: dict):
    """score(name, map_of, point_of=None): the pointing game and median share ratio of
    ``map_of(film, finding)`` on the boxes; the peak is ``hottest_red_point`` of the map unless
    ``point_of(map)`` gives the (x, y) point at the model's input size (None: no red)."""

    def score(name: str, map_of, point_of=None) -> None:
        hits, ratios = [], []
        for row in box_rows:
            box = tuple(float(row[k]) for k in "xywh")
            heat = map_of(where[row["path"]], labels.index(row["label"]))
            point = (point_of or (lambda m: hottest_red_point(m, size, size)))(heat)
            point = None if point is None else [int(np.floor(point[0])), int(np.floor(point[1]))]
            hits.append(inside(point, box))
            ratios.append(box_share_ratio(upsampled(np.clip(heat, -1, 1), size, size), box))
        by_finding: dict[str, list[int]] = {}
        for row, hit in zip(box_rows, hits, strict=True):
            by_finding.setdefault(row["label"], [0, 0])[0] += int(hit)
            by_finding[row["label"]][1] += 1
        results[name] = {"pointing": round(float(np.mean(hits)), 3), "hits": int(np.sum(hits)),
                         "median_share_ratio": round(float(np.median(ratios)), 2),
                         "by_finding": {label: f"{h}/{n}" for label, (h, n) in sorted(by_finding.items())}}
        score.raw[name] = (np.array(hits, np.float64), np.array(ratios))
        print(f"{name:60s} pointing {np.mean(hits):.3f} ({sum(hits)}/{len(hits)})  share {np.median(ratios):.2f}",
              flush=True)

    score.raw, score.rows, score.where, score.labels = {}, box_rows, where, labels
    return score


def paired(score, results: dict, base: str, other: str, draws: int = 5000) -> None:
    """``other`` − ``base`` on the same boxes: pointing and median share ratio, with 95 % intervals
    from a paired bootstrap over the boxes (seed 0)."""
    (base_hits, base_ratios), (hits, ratios) = score.raw[base], score.raw[other]
    rows = np.random.default_rng(0).integers(0, len(hits), (draws, len(hits)))
    pointing = (hits[rows] - base_hits[rows]).mean(1)
    share = np.median(ratios[rows], 1) - np.median(base_ratios[rows], 1)
    low_p, high_p = np.percentile(pointing, [2.5, 97.5])
    low_s, high_s = np.percentile(share, [2.5, 97.5])
    results[f"{other} − {base}"] = {
        "pointing": round(float(hits.mean() - base_hits.mean()), 3), "pointing_95": [round(low_p, 3), round(high_p, 3)],
        "median_share_ratio": round(float(np.median(ratios) - np.median(base_ratios)), 2),
        "median_share_ratio_95": [round(low_s, 2), round(high_s, 2)]}
    print(f"  {other} − {base}: pointing {hits.mean() - base_hits.mean():+.3f} [{low_p:+.3f}, {high_p:+.3f}], "
          f"median share {np.median(ratios) - np.median(base_ratios):+.2f} [{low_s:+.2f}, {high_s:+.2f}]", flush=True)


def standardised(film_maps: np.ndarray, normal_maps: np.ndarray, clip: bool = True, percentile: float = 99):
    """(M − mean) / std cell by cell over the normal films (per finding), then divided by the
    ``percentile``-th percentile of |that| over the normal films' cells."""
    mean, std = normal_maps.mean(0), normal_maps.std(0) + 1e-12
    z = np.abs((normal_maps - mean) / std).transpose(1, 0, 2, 3).reshape(normal_maps.shape[1], -1)
    scale = np.percentile(z, percentile, axis=1)

    def map_of(k, c):
        m = (film_maps[k, c] - mean[c]) / std[c] / scale[c]
        return np.clip(m, -1, 1) if clip else m

    return map_of


def smoothed(map_of, sigma: float):
    """The map convolved with a Gaussian of ``sigma`` cells (border: reflect) before anything else."""
    return lambda k, c: cv2.GaussianBlur(map_of(k, c).astype(np.float32), (0, 0), sigma,
                                         borderType=cv2.BORDER_REFLECT)


def up_to(map_of, shape):
    return lambda k, c: cv2.resize(map_of(k, c).astype(np.float32), shape[::-1], interpolation=cv2.INTER_LINEAR)


def top_region_centroid(fraction: float, size: int):
    """point_of: the red-weighted centroid of the connected region, at the model's input size, that
    holds the hottest point and where the map is ≥ ``fraction`` × its maximum."""

    def point_of(heat: np.ndarray):
        if heat.size == 0 or float(heat.max()) <= 0:
            return None
        big = upsampled(heat, size, size)
        peak = np.unravel_index(int(np.argmax(big)), big.shape)
        mask = (big >= fraction * float(big.max())).astype(np.uint8)
        _, regions = cv2.connectedComponents(mask, connectivity=8)
        region = regions == regions[peak]
        rows, columns = np.nonzero(region)
        weights = big[region]
        total = float(weights.sum())
        return float((columns * weights).sum()) / total + 0.5, float((rows * weights).sum()) / total + 0.5

    return point_of


PRIOR_FILMS = 800
LOOKED_AT = (("00003803_010", "Effusion"), ("00001369_000", "Cardiomegaly"))  # docs/heatmaps.md


def render(folder: Path, pack: Path, box_rows: list[dict], where: dict[str, int], labels: list[str],
           size: int, maps: dict) -> None:
    """Side by side, for the ``LOOKED_AT`` box films: each of ``maps`` (name → map_of) drawn as the
    overlay draws it, at the model's input, with the radiologist's box in green; PNGs in ``folder``."""
    from diagnosis.overlay import fit_film, render_overlay

    folder.mkdir(parents=True, exist_ok=True)
    for stem, label in LOOKED_AT:
        row = next(r for r in box_rows if stem in r["path"] and r["label"] == label)
        film = fit_film(cv2.resize(service_view(pack / row["path"]), (size, size), interpolation=cv2.INTER_AREA))
        zoom = film.shape[1] / size  # the overlay's film is enlarged for display (``fit_film``)
        x, y, w, h = (zoom * float(row[k]) for k in "xywh")
        panels = []
        for name, map_of in maps.items():
            heat = np.clip(map_of(where[row["path"]], labels.index(label)), -1, 1).astype(np.float32)
            panel = render_overlay(film, heat)
            cv2.rectangle(panel, (int(x), int(y)), (int(x + w), int(y + h)), (0, 200, 0), max(2, int(zoom)))
            cv2.putText(panel, name, (8, int(12 * zoom)), cv2.FONT_HERSHEY_SIMPLEX, zoom / 3, (0, 200, 0),
                        max(1, int(zoom / 2)))
            panels.append(panel)
        cv2.imwrite(str(folder / f"{stem}_{label}.png"), np.hstack(panels))


def prior_films(pack: Path, labels: list[str], box_rows: list[dict]) -> tuple[list[Path], np.ndarray]:
    """The films of the per-finding spatial prior: ``PRIOR_FILMS`` NIH train films (seed 0) with at
    least one of the boxes' findings, the box films themselves left out; and their labels."""
    box_labels, box_paths = {r["label"] for r in box_rows}, {r["path"] for r in box_rows}
    rows = [r for r in csv.DictReader((pack / "manifest.csv").open(encoding="utf-8"))
            if r["split"] == "train" and r["source"] == "nih_cxr14" and r["path"] not in box_paths
            and any(r.get(label) == "1" for label in box_labels)]
    chosen = np.random.default_rng(0).choice(len(rows), min(PRIOR_FILMS, len(rows)), replace=False)
    rows = [rows[i] for i in sorted(chosen)]
    return [pack / r["path"] for r in rows], np.array([[float(r[label] == "1") for label in labels] for r in rows])


def fine_candidates(score, results: dict, cache: Path, size: int, prior_labels: np.ndarray | None = None,
                    draw=None) -> None:
    """Issue #22 b2: block-2 maps (16 × 16), LayerCAM, fusions with the block-3 map, smoothing, the
    top region's centroid as the peak, and per-cell standardisation; cached by ``extract_fine``.
    With ``prior_labels`` (the labels of ``prior_films``, cached as train_fine) also a per-finding
    spatial prior: the mean clipped relative block-3 map of the train films with that finding. It
    says where the finding usually is, not where this film's evidence is."""
    boxes, normal = (load_file(str(cache / f"{n}_fine.safetensors")) for n in ("boxes", "normal"))
    gxa3 = relative(boxes["gxa3"], normal["gxa3"], clip=False)
    gxa2 = relative(boxes["gxa2"], normal["gxa2"], clip=False)
    score("gxa3 (shipped, peak before clipping)", gxa3)
    score("gxa2: block-2 gradient × activation − normal mean (16 × 16)", gxa2)
    score("gxa2, clipped before the peak", relative(boxes["gxa2"], normal["gxa2"]))
    for layer in ("2", "3"):
        score(f"lc{layer}: LayerCAM ReLU(g)·A − normal mean", relative(boxes["lc" + layer], normal["lc" + layer],
                                                                        clip=False))
        score(f"lc{layer}: LayerCAM, no normal mean (ReLU, own max)",
              lambda k, c, m=boxes["lc" + layer]: m[k, c] / (m[k, c].max() + 1e-12))
    for sigma in (0.5, 1.0, 1.5):
        score(f"gxa3 smoothed σ={sigma} cell", smoothed(gxa3, sigma))
    for sigma in (1.0, 2.0, 3.0):
        score(f"gxa2 smoothed σ={sigma} cells", smoothed(gxa2, sigma))
    gxa3_16 = up_to(gxa3, boxes["gxa2"].shape[2:])
    for weight in (0.25, 0.5, 0.75):
        score(f"({weight} gxa3↑ + {1 - weight} gxa2)",
              lambda k, c, w=weight: w * gxa3_16(k, c) + (1 - w) * gxa2(k, c))
    gxa2_s2 = smoothed(gxa2, 2.0)
    score("(gxa3↑ + gxa2 smoothed σ=2) / 2", lambda k, c: 0.5 * (gxa3_16(k, c) + gxa2_s2(k, c)))
    def product(k, c):
        fine3, fine2 = gxa3_16(k, c), gxa2(k, c)
        return np.where((fine3 > 0) & (fine2 > 0), fine3 * fine2, np.minimum(fine3, fine2))

    score("gxa3↑ × gxa2 where both red, else their min", product)
    score("geometric mean of gxa3↑ and gxa2 (red where both red, blue where both blue)",
          lambda k, c: np.sqrt(np.maximum(gxa3_16(k, c), 0) * np.maximum(gxa2(k, c), 0))
          - np.sqrt(np.maximum(-gxa3_16(k, c), 0) * np.maximum(-gxa2(k, c), 0)))
    for percentile in (95, 99.9):
        score(f"gxa3, colour scale at the {percentile}th percentile",
              relative(boxes["gxa3"], normal["gxa3"], clip=False, percentile=percentile))
    for dead in (0.1, 0.25, 0.5):
        score(f"gxa3 with a dead zone: |m| < {dead} drawn neutral",
              lambda k, c, t=dead: np.sign(gxa3(k, c)) * np.maximum(np.abs(gxa3(k, c)) - t, 0) / (1 - t))
    for fraction in (0.5, 0.7):
        score(f"gxa3, peak = centroid of the region ≥ {fraction} × max", gxa3, top_region_centroid(fraction, size))
        score(f"gxa2 σ=2, peak = centroid of the region ≥ {fraction} × max", gxa2_s2,
              top_region_centroid(fraction, size))
    per_cell = standardised(boxes["gxa3"], normal["gxa3"], clip=False)
    score("gxa3 standardised per cell", per_cell)

    def on_the_ring(map_of) -> int:  # the hottest cell on the map's outer ring of cells, over the boxes
        cells = [np.unravel_index(int(np.argmax(m)), m.shape)
                 for m in (map_of(score.where[r["path"]], score.labels.index(r["label"])) for r in score.rows)]
        side = boxes["gxa3"].shape[2]
        return sum(row in (0, side - 1) or column in (0, side - 1) for row, column in cells)

    std = normal["gxa3"].std(0)
    results["outer_ring"] = {"peaks_shipped": on_the_ring(gxa3), "peaks_standardised": on_the_ring(per_cell),
                             "normal_std_inner": round(float(std[:, 1:-1, 1:-1].mean()), 4),
                             "normal_std_ring": round(float((std.sum((1, 2)) - std[:, 1:-1, 1:-1].sum((1, 2))).mean()
                                                            / (std[0].size - std[0, 1:-1, 1:-1].size)), 4)}
    print("  hottest cell on the outer ring (of the boxes' maps), and the normal films' std of G there:",
          results["outer_ring"], flush=True)
    score("gxa2 standardised per cell", standardised(boxes["gxa2"], normal["gxa2"], clip=False))
    score("gxa2 standardised per cell, smoothed σ=2",
          smoothed(standardised(boxes["gxa2"], normal["gxa2"], clip=False), 2.0))
    if draw is not None:
        draw({"shipped gxa3": gxa3, "gxa2": gxa2, "(gxa3+gxa2)/2": lambda k, c: 0.5 * (gxa3_16(k, c) + gxa2(k, c)),
              "gxa3 x gxa2": product})
    shipped = "gxa3 (shipped, peak before clipping)"
    for other in ("(0.5 gxa3↑ + 0.5 gxa2)", "gxa3↑ × gxa2 where both red, else their min",
                  "gxa3 with a dead zone: |m| < 0.25 drawn neutral"):
        paired(score, results, shipped, other)
    if prior_labels is None:
        return
    train = load_file(str(cache / "train_fine.safetensors"))["gxa3"]
    if len(train) != len(prior_labels):
        raise SystemExit("the cached prior films are not prior_films(): extract again")
    own = relative(train, normal["gxa3"])
    prior = np.stack([np.mean([own(k, c) for k in np.flatnonzero(prior_labels[:, c])], axis=0)
                      if prior_labels[:, c].any() else np.zeros(train.shape[2:]) for c in range(train.shape[1])])
    prior = prior / np.maximum(np.abs(prior).max(axis=(1, 2), keepdims=True), 1e-12)
    score("prior alone: where the finding usually is (train labels; not this film's evidence)",
          lambda k, c: prior[c])
    score("(gxa3 + prior) / 2", lambda k, c: 0.5 * (np.clip(gxa3(k, c), -1, 1) + prior[c]))
    score("gxa3 × prior where both red, else gxa3's min with 0",
          lambda k, c: np.where((gxa3(k, c) > 0) & (prior[c] > 0), gxa3(k, c) * prior[c], np.minimum(gxa3(k, c), 0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heatmap_candidates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="feature cache (not the repository)")
    parser.add_argument("--model", type=Path, default=Path("models/chest"))
    parser.add_argument("--extract", action="store_true", help="compute the cached features first")
    parser.add_argument("--fine", action="store_true",
                        help="only the block-2 / fusion candidates (cache: boxes_fine, normal_fine)")
    parser.add_argument("--render", type=Path,
                        help="with --fine: PNGs of the main candidates on two box films here (not the repository)")
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
    where = {p: k for k, p in enumerate(box_paths)}
    results: dict[str, dict] = {}
    score = scorer(box_rows, where, labels, card.input.size, results)
    if args.fine:
        prior_paths, prior_labels = prior_films(pack, labels, box_rows)
        if args.extract:
            cache.mkdir(parents=True, exist_ok=True)
            extract_fine(network, card, [pack / p for p in box_paths], cache / "boxes_fine.safetensors")
            extract_fine(network, card, normals, cache / "normal_fine.safetensors")
            extract_fine(network, card, prior_paths, cache / "train_fine.safetensors")
        draw = None if args.render is None else (
            lambda maps: render(args.render, pack, box_rows, where, labels, card.input.size, maps))
        fine_candidates(score, results, cache, card.input.size, prior_labels, draw)
        return write_report(args, argv, box_rows, normals, results)
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

    score = scorer(box_rows, where, labels, card.input.size, results)

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
    return write_report(args, argv, box_rows, normals, results)


def write_report(args, argv, box_rows, normals, results) -> int:
    report = {"command": "python -m bench.heatmap_candidates " + " ".join(argv if argv is not None else sys.argv[1:]),
              "boxes": len(box_rows), "normal_films": len(normals), "maps": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
