"""Chest overlays relative to normal films: fit the mean normal evidence map and the colour scale.

    python -m training heatmap-baseline --model models/chest \\
        --manifest ../shared/data/xray-pack/manifest.csv [--method block3|final] [--percentile 99] \\
        [--threads N] [--dry-run]

The per-film signed map ``M_c`` (``diagnosis.heatmap``) of a finding at a low estimate is negative
almost everywhere, so drawn as it is it never points at anything. ``--method`` picks ``M_c``:

* ``block3`` (default, the card's "block3_gradient_x_activation_minus_normal_mean"): gradient ×
  activation of the logit at the block-3 map, 8 × 8 at 128 px (``block3_gradient_x_activation``);
* ``final`` ("evidence_minus_normal_mean"): ``S_c = W_c · A`` on the final map, 4 × 4 at 128 px.

This fits, on the NIH val films whose 14 labels are all 0 (each read exactly as the service reads
it: intake, photo step, the card's preprocessing, the same runner):

* ``mean`` (labels × h × w): the mean of ``M_c`` over those films, cell by cell;
* ``scale`` (labels): the ``--percentile``-th percentile of the cells' excess ``|M_c − mean_c|``
  over those films: an excess this large is drawn at full colour. Fixed per finding (not per film),
  so a normal film stays faint, and a film far from the normal ones shows strong colour.

With ``block3`` the 4 × 4 map's mean and scale are kept too (``final_mean``, ``final_scale``), so
``measure-heatmaps`` can compare the two in one run. All go into ``heatmap.safetensors`` beside the
weights, referenced from the card's ``heatmap`` section with its sha256. The NIH bounding boxes
are never read here (they only measure: ``python -m training measure-heatmaps``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from diagnosis.cards import AuxiliaryFile, HeatmapSpec, read_card, sha256_of, write_card
from diagnosis.config import PipelineConfig
from diagnosis.heatmap import BLOCK3_METHOD, block3_gradient_x_activation, signed_map
from diagnosis.pipeline import Pipeline

from ..measure.reports import emit_report

log = logging.getLogger(__name__)
ARRAYS_FILE = "heatmap.safetensors"
BATCH = 64


def normal_val_films(manifests: list[Path], labels: list[str]) -> list[Path]:
    """NIH val radiographs (digital, not photos) with every one of ``labels`` known and 0."""
    films = []
    for manifest in manifests:
        with manifest.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if (row["split"] == "val" and row["source"] in ("nih_cxr14", "nih_extra")
                        and row["body_part"] == "chest" and row["kind"] == "radiograph"
                        and row.get("phone_photo", "0") == "0" and row.get("chest_labels", "all14") == "all14"
                        and all(row.get(label) == "0" for label in labels)):
                    films.append(manifest.parent / row["path"])
    return films


def evidence_maps(pipeline: Pipeline, part: str, films: list[Path],
                  block3: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(films, labels, h, w) signed class evidence ``W_c · A`` of each film, as the service computes
    it, and with ``block3`` the block-3 gradient × activation maps (films, labels, 2h, 2w)."""
    model = pipeline.abnormality[part]
    labels = list(range(len(model.card.labels)))
    weights = model.network.classifier.weight.detach().float().cpu().numpy()[labels]
    maps, fine = [], []
    for start in range(0, len(films), BATCH):
        datas = [path.read_bytes() for path in films[start:start + BATCH]]
        _, features, block3_maps = pipeline.model_maps(part, datas, block3)
        for feature_map, block3_map in zip(features, block3_maps, strict=True):
            if feature_map is not None:
                maps.append(np.stack([signed_map(w, feature_map) for w in weights]))
                if block3:
                    fine.append(block3_gradient_x_activation(model.network, block3_map, labels))
    return np.stack(maps), (np.stack(fine) if block3 else None)


def fit(maps: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    mean = maps.mean(axis=0)
    excess = np.abs(maps - mean[None]).transpose(1, 0, 2, 3).reshape(maps.shape[1], -1)
    scale = np.percentile(excess, percentile, axis=1)
    return mean.astype(np.float32), np.maximum(scale, 1e-6).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training heatmap-baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the abnormality model folder (e.g. models/chest)")
    parser.add_argument("--manifest", action="append", required=True, type=Path, help="xray-pack style manifest.csv")
    parser.add_argument("--method", choices=["block3", "final"], default="block3",
                        help="block3: gradient × activation at block 3 (8 × 8 at 128 px); final: W_c · A (4 × 4)")
    parser.add_argument("--percentile", type=float, default=99.0,
                        help="the colour scale: this percentile of |excess| over normal val cells is full colour")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache", type=Path, help="the models' ONNX export cache (default: the service's; not the "
                                                   "repository)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    folder = args.model
    card = read_card(folder)
    part = card.body_part
    options = {"cache_dir": args.cache} if args.cache else {}
    pipeline = Pipeline.load(PipelineConfig(models_dir=folder.parent, threads=args.threads,
                                            abnormality_models={part: str(folder.resolve())}, **options))
    films = normal_val_films(args.manifest, card.labels)
    log.info("%d normal val films", len(films))
    block3 = args.method == "block3"
    maps, fine = evidence_maps(pipeline, part, films, block3)
    final_mean, final_scale = fit(maps, args.percentile)
    mean, scale = fit(fine, args.percentile) if block3 else (final_mean, final_scale)
    report = {
        "command": "python -m training heatmap-baseline " + " ".join(argv if argv is not None else sys.argv[2:]),
        "films": len(maps),
        "method": args.method,
        "map_shape": list(mean.shape[1:]),
        "percentile": args.percentile,
        "scale": {label: round(float(s), 4) for label, s in zip(card.labels, scale, strict=True)},
    }
    if not args.dry_run:
        path = folder / ARRAYS_FILE
        arrays = {"mean": mean, "scale": scale}
        if block3:
            arrays.update(final_mean=final_mean, final_scale=final_scale)
        save_file(arrays, str(path))
        size = f"{mean.shape[1]}×{mean.shape[2]} at {card.input.size} px"
        signed = (f"G_c = Σ_k B_k · ∂z_c/∂B_k (gradient × activation of the logit at the block-3 map B, "
                  f"features.transition3.relu, {size})" if block3 else
                  f"S_c = W_c · A (A: post-ReLU final map, {size})")
        card.heatmap = HeatmapSpec(
            method=BLOCK3_METHOD if block3 else "evidence_minus_normal_mean",
            layer="features.transition3.relu (block 3)" if block3 else card.heatmap_layer,
            arrays=AuxiliaryFile(file=ARRAYS_FILE, sha256=sha256_of(path)),
            method_notes=(f"{signed} minus its mean over {len(maps)} NIH val films with all "
                          f"{len(card.labels)} labels 0, divided by the {args.percentile:g}th percentile of "
                          "|excess| over their cells and clipped to [-1, 1]: red where this film raised the "
                          "estimate more than a typical normal film does. Fitted by python -m training "
                          "heatmap-baseline; measured on the NIH boxes by python -m training measure-heatmaps "
                          "(docs/heatmaps.md)."),
            metrics={"fitted_on": report},
        )
        write_card(folder, card)
    return emit_report(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
