"""Are the heatmap overlays a user receives ever blank, and what do they cost?

    python -m training measure-heatmaps --manifest ../shared/data/xray-pack/manifest.csv --split test \\
        [--limit N] [--models DIR] [--json OUT] [--save DIR] [--threads N]

Runs the real pipeline (``diagnosis.pipeline.Pipeline``, the shipped models) on the chest
radiographs of one split (digital films, no phone photos) and, for every film the pipeline analyses
as a chest, looks at each finding it draws (``result.heatmap_labels``: the flagged findings, at most
three, else the top one):

* **blank panels**, old vs new in the same run. A panel is *blank* when fewer than 1 % of the film's
  pixels differ in colour from the plain film by more than 8 grey levels (any channel, on the
  rendered image before JPEG), i.e. the user sees no colour at all. *Old*: the ReLU CAM (Grad-CAM's
  map, ``class_activation_map``) blended as the PIL renderer did (jet colours, opacity 0.45·heat).
  *New*: the signed class evidence (``class_evidence``) blended by ``diagnosis.overlay``. Also
  reported: the share of maps whose values span less than 0.05 ("flat", ``heatmap.is_flat``).
* panels (overlays) per film, the overlays' pixel size and JPEG bytes, and the pipeline's overlay
  time per film (``timings_ms["overlay"]``, all drawn panels).
* a same-run timing of the overlay on a 1280 px film: the removed PIL renderer (kept here, only as
  the baseline) with one and three panels vs the OpenCV renderer, one JPEG per panel.

``--save DIR`` writes the overlays of the first films (JPEG and a PNG copy for viewers) to look at.

With ``--boxes nih-bboxes.csv`` (issue #22) it measures instead *where* the maps point, on the pack's
radiologist boxes (never used for fitting anything), all maps in the same run:

* **pointing game**: each box's finding is drawn (``Pipeline.run(draw=[label])``, red included
  whatever was flagged); a hit is the overlay's ``peaks`` entry (its hottest red point, in the input
  image's pixels) inside the box, no margin; a map with no red misses. Compared: the shipped map
  (the card's ``heatmap``: since issue #22 the 8 × 8 block-3 gradient × activation minus its normal
  mean), the 4 × 4 ``W_c · A`` minus its normal mean (shipped before; the card keeps its arrays),
  the older signed map (``class_evidence``), the Grad-CAM reference (pytorch-grad-cam at
  ``features.denseblock3``, 8 × 8, and at the final ReLU, 4 × 4) and a fixed point at the image centre.
* **share ratio**: the share of the map's red evidence (positive part, upsampled to the image) that
  lies inside the box, divided by the box's share of the film; the median over boxes (0 without red).
* on ``--split`` films: of the overlays of **flagged** findings, the share that show a red area ≥ 2 %
  of the film (pixels whose rendered colour is visibly red); on films with all 14 labels 0, the red
  and the coloured share of the top finding's map drawn with red; and the time per overlay (map +
  rendering) of each map, and of the chest model's runner with and without the block-3 map, same run.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from diagnosis.config import PipelineConfig, models_dir_from_environment
from diagnosis.heatmap import (
    class_activation_map,
    class_evidence,
    grad_cam,
    hottest_red_point,
    is_flat,
    upsampled,
)
from diagnosis.intake import decode
from diagnosis.overlay import _blend, _upsample, fit_film, render_overlays
from diagnosis.photo import rectify
from diagnosis.pipeline import Pipeline, to_input_pixels
from training.data.datasets import CHEST_LABELS
from training.measure.reports import emit_report

COLOUR_LEVELS = 8  # a pixel "has colour" when a channel differs from the plain film by more than this
BLANK_SHARE = 0.01  # a panel with fewer coloured pixels than this share is blank


def chest_films(manifest: Path, split: str, limit: int | None) -> list[Path]:
    root = manifest.parent
    with manifest.open(encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle)
                if row["split"] == split and row["body_part"] == "chest" and row["kind"] == "radiograph"
                and row["phone_photo"] == "0"]
    if limit and limit < len(rows):  # evenly spread over the split, not its first rows
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    for row in rows:  # the 14 labels, for telling normal films (all 0) apart
        _LABEL_ROWS[str(root / row["path"])] = [v for k, v in row.items() if k in CHEST_LABELS]
    return [root / row["path"] for row in rows]


def coloured_share(film: np.ndarray, shown: np.ndarray) -> float:
    """Share of pixels whose colour differs from the plain film by more than COLOUR_LEVELS."""
    return float((cv2.absdiff(film, shown).max(axis=2) > COLOUR_LEVELS).mean())


def old_blend(film: np.ndarray, relu_cam: np.ndarray) -> np.ndarray:
    """The removed renderer's colouring: jet colours, opacity 0.45·heat (heat: ReLU CAM in [0, 1])."""
    height, width = film.shape[:2]
    heat = np.clip(cv2.resize(relu_cam.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    coloured = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (0.45 * heat)[..., None]
    return np.round(film * (1 - weight) + coloured * weight).astype(np.uint8)


# ------------------------------------------------------------------ the removed PIL renderer (baseline)
def legacy_pil_overlay(gray: np.ndarray, panels: list[tuple[str, np.ndarray]]) -> bytes:
    """The overlay as it was before the OpenCV rewrite: PIL panels side by side, JPEG q90 (timing only)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    table = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    image = Image.fromarray(gray, mode="L")
    if max(image.size) > 1280:
        image.thumbnail((1280, 1280), Image.Resampling.BILINEAR, reducing_gap=2.0)
    elif max(image.size) < 512:
        scale = 512 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    rendered = []
    for title, heatmap in panels[:3]:
        width, height = image.size
        heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), mode="L")
        heat = heat.resize((width, height), Image.Resampling.BICUBIC)
        coloured = heat.copy()
        coloured.putpalette(table.tobytes())
        coloured = coloured.convert("RGB")
        mask = heat.point([round(0.45 * i) for i in range(256)])
        blended = Image.composite(coloured, image.convert("RGB"), mask)
        font_size = max(12, height // 28)
        bar = font_size + 8
        canvas = Image.new("RGB", (width + 18 + 6 * font_size // 2, height + bar), (0, 0, 0))
        canvas.paste(blended, (0, bar))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 4), title, fill=(255, 255, 255), font=ImageFont.load_default(size=font_size))
        legend = table[np.linspace(255, 0, height).astype(np.uint8)]
        canvas.paste(Image.fromarray(np.repeat(legend[:, None, :], 18, axis=1)), (width + 2, bar))
        rendered.append(canvas)
    sheet = Image.new("RGB", (sum(p.width for p in rendered), max(p.height for p in rendered)), (0, 0, 0))
    x = 0
    for panel in rendered:
        sheet.paste(panel, (x, 0))
        x += panel.width
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def time_renderers(gray: np.ndarray, signed: list[np.ndarray], relu: list[np.ndarray], repeats: int = 40) -> dict:
    """Median ms on a 1280 px film: old PIL (one sheet) vs new OpenCV (one JPEG per finding).

    Old and new calls alternate, so a busy machine slows both alike."""
    film = cv2.resize(gray, (1280, round(1280 * gray.shape[0] / gray.shape[1])), interpolation=cv2.INTER_CUBIC)
    out: dict = {"film_px": list(film.shape[::-1]), "repeats": repeats}
    for count in (1, 3):
        titles = [(f"Finding {i} 12%", relu[i % len(relu)]) for i in range(count)]
        maps = [signed[i % len(signed)] for i in range(count)]
        calls = {f"old_pil_{count}_panel_ms": lambda t=titles: legacy_pil_overlay(film, t),
                 f"new_opencv_{count}_overlay_ms": lambda m=maps: render_overlays(film, m)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for round_ in range(repeats + 1):
            for name, call in calls.items():
                clock = time.perf_counter()
                call()
                if round_:  # the first round warms up (fonts, colour tables)
                    times[name].append((time.perf_counter() - clock) * 1000)
        out.update({name: round(statistics.median(values), 2) for name, values in times.items()})
    return out


def measure(manifest: Path, split: str, limit: int | None, models: Path, save: Path | None,
            threads: int | None) -> dict:
    pipeline = Pipeline.load(PipelineConfig(models_dir=models, threads=threads))
    chest = pipeline.abnormality["chest"]
    weights = chest.network.classifier.weight.detach().float().cpu().numpy()
    films = chest_films(manifest, split, limit)
    panels_per_film, overlay_ms, jpeg_bytes, sizes = [], [], [], []
    old_blank = new_blank = old_flat = new_flat = panels = 0
    positives_drawn = top_drawn = 0
    timing = None
    for number, path in enumerate(films):
        data = path.read_bytes()
        analysis = pipeline.run(data, file=str(path))
        result = analysis.result
        if result.outcome != "analysed" or result.body_part != "chest":
            continue
        gray = decode(data).gray
        gray = rectify(gray).gray if pipeline.photo_step else gray  # the film the pipeline drew on
        _, features = chest.runner(chest.prepare(gray)[None])
        film = fit_film(gray)
        panels_per_film.append(len(analysis.overlays))
        overlay_ms.append(result.timings_ms["overlay"])
        flagged = {f.label for f in result.positive_findings}
        signed_maps, relu_maps = [], []
        for label, jpeg in analysis.overlays:
            index = chest.card.labels.index(label)
            signed = class_evidence(weights[index], features[0])
            relu = class_activation_map(weights[index], features[0])
            signed_maps.append(signed)
            relu_maps.append(relu)
            height, width = film.shape[:2]
            new = _blend(film, _upsample(signed, width, height))
            old = old_blend(film, relu)
            new_blank += coloured_share(film, new) < BLANK_SHARE
            old_blank += coloured_share(film, old) < BLANK_SHARE
            new_flat += is_flat(signed)
            old_flat += is_flat(relu)
            panels += 1
            positives_drawn += label in flagged
            top_drawn += label not in flagged
            jpeg_bytes.append(len(jpeg))
            shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            sizes.append(max(shown.shape[:2]))
            if save is not None and number < 8:
                save.mkdir(parents=True, exist_ok=True)
                stem = f"{path.stem}_{label}_{result.findings[0].label}"
                (save / f"{stem}.jpg").write_bytes(jpeg)
                cv2.imwrite(str(save / f"{stem}.png"), shown)
        if timing is None:
            timing = time_renderers(gray, signed_maps, relu_maps)
    films_analysed = len(panels_per_film)
    return {
        "command": "python -m training measure-heatmaps " + " ".join(sys.argv[2:]),
        "split": split,
        "films": len(films),
        "films_analysed_as_chest": films_analysed,
        "panels": panels,
        "panels_per_film_mean": round(panels / max(films_analysed, 1), 3),
        "panels_per_film_histogram": {str(k): panels_per_film.count(k) for k in sorted(set(panels_per_film))},
        "panels_of_flagged_findings": positives_drawn,
        "panels_of_the_top_finding_none_flagged": top_drawn,
        "blank_definition": f"< {BLANK_SHARE:.0%} of film pixels differ from the plain film by > "
                            f"{COLOUR_LEVELS} levels",
        "blank_share_old_relu_cam": round(old_blank / max(panels, 1), 4),
        "blank_share_new_signed": round(new_blank / max(panels, 1), 4),
        "flat_share_old_relu_cam": round(old_flat / max(panels, 1), 4),
        "flat_share_new_signed": round(new_flat / max(panels, 1), 4),
        "overlay_longest_side_px": sorted(set(sizes)),
        "overlay_jpeg_kb_mean": round(statistics.mean(jpeg_bytes) / 1024, 1) if jpeg_bytes else None,
        "pipeline_overlay_ms_per_film_median": round(statistics.median(overlay_ms), 2) if overlay_ms else None,
        "renderer_timing_1280px": timing,
    }


RED_AREA = 0.02  # a flagged finding's overlay should show at least this share of the film in red
CHEST_LABELS_14 = 14


def red_share(film: np.ndarray, heatmap: np.ndarray) -> tuple[float, float]:
    """(visibly red, visibly coloured) shares of the film's pixels in the rendered overlay."""
    height, width = film.shape[:2]
    shown = _blend(film, _upsample(heatmap, width, height))
    coloured = cv2.absdiff(film, shown).max(axis=2) > COLOUR_LEVELS
    red = coloured & (shown[..., 2].astype(int) > shown[..., 0].astype(int))
    return float(red.mean()), float(coloured.mean())


def gradcam_block3(network, tensor, index: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM at the output of denseblock3 (8 × 8 at 128 px), at input size."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.inference_mode(False), torch.enable_grad(), \
            GradCAM(model=network, target_layers=[network.features.denseblock3]) as cam:
        return cam(input_tensor=tensor.float().clone(), targets=[ClassifierOutputTarget(index)])[0]


def box_share_ratio(big: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Share of the positive evidence inside the box ÷ the box's share of the image (0: no red)."""
    x, y, w, h = box
    height, width = big.shape
    columns, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    inside = (columns >= x) & (columns <= x + w) & (rows >= y) & (rows <= y + h)
    positive = np.maximum(big, 0.0)
    total = float(positive.sum())
    if total <= 0 or not inside.any():
        return 0.0
    return float(positive[inside].sum()) / total / float(inside.mean())


def inside(point, box) -> bool:
    if point is None:
        return False
    x, y, w, h = box
    px, py = point[0] + 0.5, point[1] + 0.5  # the pixel's centre
    return x <= px <= x + w and y <= py <= y + h


def relative_maps(chest, index: int, features: np.ndarray, block3: np.ndarray,
                  clip: bool = True, only: str | None = None) -> dict[str, np.ndarray | None]:
    """The shipped map (the card's method) and the 4 × 4 relative map of one finding of one film
    (``only``: just that one of the two, for timing)."""
    weights = chest.network.classifier.weight.detach().float().cpu().numpy()
    baseline = chest.baseline
    if baseline is None:
        return {"shipped": None, "final_4x4_relative": None}
    final = baseline.evidence(index, weights[index], features) \
        if (baseline.final or not baseline.needs_block3) and only != "shipped" else None
    if not baseline.needs_block3:
        return {"shipped": final, "final_4x4_relative": final}
    if only == "final_4x4_relative":
        return {"shipped": None, "final_4x4_relative": final}
    shipped = baseline.block3_evidence(chest.network, block3, [index], clip)[0]
    return {"shipped": shipped, "final_4x4_relative": final}


def pointing(pipeline: Pipeline, boxes_csv: Path, save: Path | None) -> dict:
    """The pointing game and share ratio on the radiologist boxes, every map in the same run."""
    import torch

    chest = pipeline.abnormality["chest"]
    weights = chest.network.classifier.weight.detach().float().cpu().numpy()
    root = boxes_csv.parent
    with boxes_csv.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    maps = ("shipped", "final_4x4_relative", "today_signed", "gradcam_block3", "gradcam_final", "centre")
    hits: dict[str, list[bool]] = {m: [] for m in maps}
    ratios: dict[str, list[float]] = {m: [] for m in maps}
    per_label: dict[str, dict[str, list[bool]]] = {}
    skipped = 0
    for row in rows:
        data = (root / row["path"]).read_bytes()
        box = tuple(float(row[k]) for k in ("x", "y", "w", "h"))
        analysis = pipeline.run(data, file=row["path"], draw=[row["label"]])
        result = analysis.result
        if result.outcome != "analysed" or result.body_part != "chest":
            skipped += 1
            for m in maps:  # the service gives no map: a miss for every map
                hits[m].append(False)
                ratios[m].append(0.0)
            continue
        gray = decode(data).gray
        upright = np.ascontiguousarray(np.rot90(gray, -result.turned // 90)) if result.turned else gray
        prepared = chest.prepare(upright)
        _, features, block3 = chest.runner(prepared[None], block3=True)
        index = chest.card.labels.index(row["label"])
        size = chest.card.input.size
        drawn = relative_maps(chest, index, features[0], block3[0])
        unclipped = relative_maps(chest, index, features[0], block3[0], clip=False)  # where peaks are found
        tensor = torch.from_numpy(prepared)[None]
        candidates = {
            **drawn,
            "today_signed": class_evidence(weights[index], features[0]),
            "gradcam_block3": gradcam_block3(chest.network, tensor, index),
            "gradcam_final": grad_cam(chest.network, tensor, index),
        }
        height, width = upright.shape
        for name, heatmap in candidates.items():
            if heatmap is None:
                continue
            point = hottest_red_point(unclipped.get(name, heatmap), size, size)
            if point is not None:
                point = to_input_pixels((point[0] * width / size, point[1] * height / size), (height, width),
                                        result.turned, None, gray.shape)
            if name == "shipped":  # what --json says must be what is measured
                assert point == result.peaks[0], (point, result.peaks)
            hits[name].append(inside(point, box))
            big = upsampled(heatmap, width, height)
            if result.turned:
                big = np.ascontiguousarray(np.rot90(big, result.turned // 90))
            ratios[name].append(box_share_ratio(big, box))
        centre = [gray.shape[1] // 2, gray.shape[0] // 2]
        hits["centre"].append(inside(centre, box))
        ratios["centre"].append(0.0)  # a point carries no evidence map
        per_label.setdefault(row["label"], {m: [] for m in maps})
        for m in maps:
            if hits[m]:
                per_label[row["label"]][m].append(hits[m][-1])
        if save is not None and len(list(save.glob("box_*.jpg"))) < 200:
            save.mkdir(parents=True, exist_ok=True)
            stem = f"box_{Path(row['path']).stem}_{row['label']}"
            (save / f"{stem}.jpg").write_bytes(analysis.overlays[0][1])
    return {
        "boxes": len(rows),
        "boxes_not_analysed_as_chest": skipped,
        "pointing_game": {m: round(float(np.mean(h)), 3) for m, h in hits.items() if h},
        "hits": {m: int(np.sum(h)) for m, h in hits.items() if h},
        "median_share_ratio": {m: round(float(np.median(r)), 2) for m, r in ratios.items() if r and m != "centre"},
        "pointing_by_finding": {label: {"boxes": len(v["centre"]),
                                        **{m: int(np.sum(h)) for m, h in v.items() if h}}
                                for label, v in sorted(per_label.items())},
    }


def red_areas(pipeline: Pipeline, films: list[Path], repeats_timing: int = 20, timing_only: bool = False) -> dict:
    """Flagged findings: share of overlays with a red area ≥ RED_AREA; normal films: red/coloured share
    of the top finding drawn with red; time per overlay (map + rendering at display size) per map."""
    import torch

    chest = pipeline.abnormality["chest"]
    weights = chest.network.classifier.weight.detach().float().cpu().numpy()
    labels = chest.card.labels
    flagged_red, normal_red, normal_coloured, today_flagged_red, final_flagged_red = [], [], [], [], []
    normal_red_final = []
    normal_films = {str(p) for p in films if all(v == "0" for v in _labels_of(p, labels))}
    timing_sample = None
    for path in films:
        data = path.read_bytes()
        result = pipeline.run(data, file=str(path), make_overlay=False).result
        if result.outcome != "analysed" or result.body_part != "chest":
            continue
        gray = decode(data).gray
        upright = np.ascontiguousarray(np.rot90(gray, -result.turned // 90)) if result.turned else gray
        prepared = chest.prepare(upright)
        _, features, block3 = chest.runner(prepared[None], block3=True)
        film = fit_film(upright)
        for finding in result.positive_findings[:3]:
            index = labels.index(finding.label)
            maps = relative_maps(chest, index, features[0], block3[0])
            flagged_red.append(red_share(film, maps["shipped"])[0])
            if maps["final_4x4_relative"] is not None:
                final_flagged_red.append(red_share(film, maps["final_4x4_relative"])[0])
            today_flagged_red.append(red_share(film, class_evidence(weights[index], features[0]))[0])
        if str(path) in normal_films and result.findings:
            index = labels.index(result.findings[0].label)
            maps = relative_maps(chest, index, features[0], block3[0])
            red, coloured = red_share(film, maps["shipped"])
            normal_red.append(red)
            normal_coloured.append(coloured)
            if maps["final_4x4_relative"] is not None:
                normal_red_final.append(red_share(film, maps["final_4x4_relative"])[0])
        if timing_sample is None:
            timing_sample = (upright, prepared, features[0], block3[0], labels.index(result.findings[0].label))
            if timing_only:
                break
    timing = {}
    if timing_sample is not None:
        upright, prepared, feature_map, block3_map, index = timing_sample
        tensor = torch.from_numpy(prepared)[None]
        calls = {
            "today_signed_ms": lambda: render_overlays(upright, [class_evidence(weights[index], feature_map)]),
            "final_4x4_relative_ms": lambda: render_overlays(upright, [relative_maps(
                chest, index, feature_map, block3_map, only="final_4x4_relative")["final_4x4_relative"]]),
            "shipped_ms": lambda: render_overlays(upright, [relative_maps(chest, index, feature_map, block3_map,
                                                                          only="shipped")["shipped"]]),
            "gradcam_block3_ms": lambda: render_overlays(upright, [gradcam_block3(chest.network, tensor, index)]),
            # The chest model's forward pass for one film (mirror average included), without and with
            # the block-3 map returned.
            "chest_runner_ms": lambda: chest.runner(prepared[None]),
            "chest_runner_with_block3_ms": lambda: chest.runner(prepared[None], block3=True),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for round_ in range(repeats_timing + 1):
            for name, call in calls.items():
                clock = time.perf_counter()
                call()
                if round_:
                    times[name].append((time.perf_counter() - clock) * 1000)
        timing = {"film_px": list(upright.shape[::-1]), "repeats": repeats_timing,
                  **{name: round(statistics.median(v), 2) for name, v in times.items()}}
    return {
        "flagged_overlays": len(flagged_red),
        f"flagged_with_red_area_ge_{RED_AREA:.0%}_shipped": round(float(np.mean(np.array(flagged_red) >= RED_AREA)), 3)
        if flagged_red else None,
        f"flagged_with_red_area_ge_{RED_AREA:.0%}_final_4x4_relative":
            round(float(np.mean(np.array(final_flagged_red) >= RED_AREA)), 3) if final_flagged_red else None,
        f"flagged_with_red_area_ge_{RED_AREA:.0%}_today_signed":
            round(float(np.mean(np.array(today_flagged_red) >= RED_AREA)), 3) if today_flagged_red else None,
        "normal_films": len(normal_red),
        "normal_top_finding_red_share_median": round(float(np.median(normal_red)), 4) if normal_red else None,
        "normal_top_finding_red_share_p90": round(float(np.percentile(normal_red, 90)), 4) if normal_red else None,
        "normal_top_finding_red_share_median_final_4x4_relative":
            round(float(np.median(normal_red_final)), 4) if normal_red_final else None,
        "normal_top_finding_red_share_p90_final_4x4_relative":
            round(float(np.percentile(normal_red_final, 90)), 4) if normal_red_final else None,
        "normal_top_finding_coloured_share_median": round(float(np.median(normal_coloured)), 4)
        if normal_coloured else None,
        "time_per_overlay_map_plus_render": timing,
    }


_LABEL_ROWS: dict[str, list[str]] = {}


def _labels_of(path: Path, labels: list[str]) -> list[str]:
    return _LABEL_ROWS.get(str(path), ["?"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training measure-heatmaps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=Path, help="xray-pack manifest.csv")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, help="at most N films, evenly spread over the split")
    parser.add_argument("--models", type=Path, help="models folder (default: $MODELS_DIR, else models/)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--save", type=Path, help="write the overlays of the first films here (JPEG + PNG)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--timing-only", action="store_true", help="with --boxes: only the time per overlay "
                        "and per chest forward pass, on the first analysed --split film")
    parser.add_argument("--boxes", type=Path, help="nih-bboxes.csv: measure where the maps point (pointing game, "
                        "share ratio), then red areas and time per overlay on --split films")


def run(args: argparse.Namespace) -> int:
    if args.boxes:
        models = args.models or models_dir_from_environment()
        pipeline = Pipeline.load(PipelineConfig(models_dir=models, threads=args.threads))
        films = chest_films(args.manifest, args.split, args.limit)
        if args.timing_only:
            return emit_report({"command": "python -m training measure-heatmaps " + " ".join(sys.argv[2:]),
                                "films": red_areas(pipeline, films, timing_only=True)}, args.json)
        report = {"command": "python -m training measure-heatmaps " + " ".join(sys.argv[2:]),
                  "pointing": pointing(pipeline, args.boxes, args.save),
                  "split": args.split,
                  "films": red_areas(pipeline, films)}
        return emit_report(report, args.json)
    report = measure(args.manifest, args.split, args.limit, args.models or models_dir_from_environment(),
                     args.save, args.threads)
    return emit_report(report, args.json)
