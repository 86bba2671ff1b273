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
from diagnosis.heatmap import class_activation_map, class_evidence, is_flat
from diagnosis.intake import decode
from diagnosis.overlay import _blend, _upsample, fit_film, render_overlays
from diagnosis.photo import rectify
from diagnosis.pipeline import Pipeline
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


def run(args: argparse.Namespace) -> int:
    report = measure(args.manifest, args.split, args.limit, args.models or models_dir_from_environment(),
                     args.save, args.threads)
    return emit_report(report, args.json)
