"""Is the image good enough to analyse? Checked after ``photo.rectify``, before the models run.

Each problem has a code and concrete advice (``messages.ADVICE``, English, translated through the gettext
catalogs). Exposure and glare are judged on the film's *raw* pixels (before the contrast stretch
of rectification, which would hide both); sharpness on what the models will see.

Thresholds were picked on the val split with ``training/measure/quality.py`` (real radiographs,
phone photos of films included, and deliberately degraded copies of them), then checked on test:

    python -m training measure-quality --manifest ../shared/data/xray-pack/manifest.csv --split val
    → real radiographs wrongly refused 12 / 2007 (0.60 %)
    python -m training measure-quality --manifest ../shared/data/xray-pack/manifest.csv --split test
    → real radiographs wrongly refused 10 / 1511 (0.66 %; target ≤ 2 %): 8 RSNA hand images (5 really
      that dark, 3 cropped by rectify to a scanned film's inner frame, too small), 2 shoulder implants
      ("glare"). Degraded copies (300 per kind) refused with the matching code: too_dark 100 %,
      too_bright 100 %, blurred 98.3 %, glare 92.7 %, film_too_small 92.7 % (the rest: a film that
      small was not found at all, so nothing tells it apart from a digital file).
    Since glare is asked of photos only (2026-12-06, issue #21; the same commands): val 4 / 2007
    (0.20 %), test 6 / 1511 (0.40 %: 5 very dark hand files, 1 spine file of 512 px judged as a photo);
    since a photo is colour or has a film found in it (``photo.models_view``): val 3 / 2007, test
    5 / 1511 (0.33 %: the 5 very dark hand files); since a dark file is windowed
    (``photo.brighten_if_dark``; 2026-12-07): val 1 / 2007 (a colour spine picture: glare), test 0 / 1511.
"""

from __future__ import annotations

import cv2
import numpy as np

from .photo import DARK_P99, Rectified, gray_percentiles

WORK_SIDE = 256  # every measure is taken at (at most) this long side, like the models' inputs

# Picked on val (see the module docstring); comments give the quantiles of real radiographs on val.
BRIGHT_P1 = 170  # 1st percentile; real: 99.9 % quantile 121; washed-out copies ≥ 204
BLUR_EFFECT = 0.65  # Crete et al. blur effect (0 sharp … 1 flat); real: 99 % 0.56, 99.9 % 0.63
GLARE_FRACTION = 0.03  # largest blown-out (≥ 250) blob clear of the edge, fraction of the film; real: 99 % 0.001
# Specular reflection (a lamp on glossy film): a compact saturated blob clear of the edge that is a
# local peak (the film around it, out to twice its size, is much darker), unlike bright bone or
# overexposed areas (plateaus) and text or markers (thin strokes). Picked on val with
# ``python -m training measure-glare --split val --choose`` (figures there and in docs/photos.md).
SPECULAR_LEVEL = 245  # core: at least this bright after a light smoothing, opened by a 5 px disc
SPECULAR_SURROUND = 150  # mean brightness of the annulus one to two core radii out: at most this
SPECULAR_FRACTION = 0.0005  # core area, fraction of the film
MIN_SIDE = 64  # px of the radiograph's short side after straightening: intake's minimum for any file
MIN_FILM_FRACTION = 0.20  # of the photo's frame: below it the film is far away and its detail lost

CODES = ("too_dark", "too_bright", "blurred", "glare", "too_small", "film_too_small")

# The advice texts live with every other user-facing text, in messages.py (no OpenCV there).


def check_quality(gray: np.ndarray, rectified: Rectified, photographed: bool = True, input_side: int = 0) -> list[str]:
    """Problem codes for an intake image (empty list: fine to analyse), in ``CODES`` order.

    ``photographed`` (``Rectified.photographed``): only a photo of a film can carry a
    lamp's reflection; in a digital file a bright blob clear of the edge is a metal implant or a
    marker (on val it refused 9 of 2,001 good files, most of them shoulder implants, docs/photos.md).
    ``input_side``: the models' input side; a picture at least that large never has "too few
    pixels": when its straightened film is that small, the film was photographed from too far."""
    metrics = quality_metrics(gray, rectified)
    problems = []
    if metrics["p99"] < DARK_P99 and not rectified.brightened:  # a dark file is windowed, not refused
        problems.append("too_dark")
    if metrics["p1"] > BRIGHT_P1:
        problems.append("too_bright")
    if metrics["blur"] > BLUR_EFFECT and "too_dark" not in problems and "too_bright" not in problems:
        problems.append("blurred")  # a nearly flat image always looks blurred: exposure is the cause
    if photographed and (metrics["glare"] > GLARE_FRACTION or metrics["specular"] > SPECULAR_FRACTION):
        problems.append("glare")
    few_pixels = metrics["short_side"] < MIN_SIDE
    if few_pixels and min(gray.shape) < input_side:
        problems.append("too_small")
    far = rectified.film_fraction < MIN_FILM_FRACTION or (few_pixels and "too_small" not in problems)
    if rectified.rectified and far:
        problems.append("film_too_small")
    return problems


def quality_metrics(gray: np.ndarray, rectified: Rectified) -> dict[str, float]:
    """The measures behind ``check_quality`` (for measuring thresholds and for logs)."""
    raw = _raw_film(gray, rectified)
    p1, p99 = gray_percentiles(raw, 1.0, 99.0)
    seen = _downscale(rectified.gray)
    return {
        "p1": float(p1),
        "p99": float(p99),
        "blur": blur_effect(seen),
        "glare": _largest_blown_out_blob(raw),
        "specular": specular_blob(raw),
        "short_side": float(min(rectified.gray.shape)),
        "film_fraction": float(rectified.film_fraction),
    }


def blur_effect(gray: np.ndarray, size: int = 11) -> float:
    """No-reference blur measure of Crete et al. (2007), as skimage's ``blur_effect``.

    Blurring an already blurred image changes its neighbour differences little; blurring a sharp
    one changes them a lot. 0 = sharp, 1 = no detail at all. Independent of contrast.
    """
    image = gray.astype(np.float32)
    worst = 0.0
    for axis in (0, 1):
        kernel = (size, 1) if axis == 0 else (1, size)  # cv2 takes (width, height)
        blurred = cv2.blur(image, kernel[::-1], borderType=cv2.BORDER_REFLECT)
        sharp_diff = np.abs(np.diff(image, axis=axis))
        blurred_diff = np.abs(np.diff(blurred, axis=axis))
        lost = np.maximum(0.0, sharp_diff - blurred_diff)
        inner = (slice(size, -size), slice(size, -size))  # ignore borders the filter had to invent
        total = float(sharp_diff[inner].sum())
        if total <= 0:
            return 1.0
        worst = max(worst, (total - float(lost[inner].sum())) / total)
    return worst


def _raw_film(gray: np.ndarray, rectified: Rectified) -> np.ndarray:
    """The radiograph's pixels as photographed (no contrast stretch), at most WORK_SIDE px."""
    if not rectified.rectified or rectified.corners is None:
        return _downscale(gray)
    # Downscale first (area averaging, no aliasing), then warp the film out of the smaller copy.
    scale = min(1.0, 2 * WORK_SIDE / max(gray.shape))
    source = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
    height, width = rectified.gray.shape
    fit = min(1.0, WORK_SIDE / max(height, width))
    size = (max(int(width * fit), 1), max(int(height * fit), 1))
    target = np.float32([[0, 0], [size[0] - 1, 0], [size[0] - 1, size[1] - 1], [0, size[1] - 1]])
    matrix = cv2.getPerspectiveTransform((rectified.corners * scale).astype(np.float32), target)
    return cv2.warpPerspective(source, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _downscale(gray: np.ndarray) -> np.ndarray:
    height, width = gray.shape
    scale = WORK_SIDE / max(height, width)
    if scale >= 1.0:
        return gray
    return cv2.resize(gray, (max(round(width * scale), 1), max(round(height * scale), 1)),
                      interpolation=cv2.INTER_AREA)


def _largest_blown_out_blob(raw: np.ndarray) -> float:
    """Area of the largest blown-out (≥ 250) blob clear of the image's edge, as a fraction of the image.

    A lamp's reflection saturates the sensor over a compact blob on the film. Radiographs have small
    saturated spots (markers, text, implant edges) and sometimes white collimation margins or
    overexposed areas, but those run into the image's edge.
    """
    blown = (raw >= 250).astype(np.uint8)
    if not blown.any():
        return 0.0
    blown = cv2.morphologyEx(blown, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # drop specks and text
    _, _, stats, _ = cv2.connectedComponentsWithStats(blown, connectivity=8)
    height, width = raw.shape
    largest = 0
    for left, top, box_w, box_h, area in stats[1:]:
        if left > 0 and top > 0 and left + box_w < width and top + box_h < height:
            largest = max(largest, int(area))
    return largest / float(raw.size)


def specular_blob(raw: np.ndarray, level: int = SPECULAR_LEVEL, surround: float = SPECULAR_SURROUND) -> float:
    """Area (fraction of the image) of the largest specular-looking blob: a compact saturated core
    (it survives opening by a 5 px disc, so text and thin markers do not), clear of the image's edge,
    with a dark surround (mean of the annulus one to two core radii out ≤ ``surround``): a peak of
    light on the film, not a bright plateau of bone. 0 when none.
    """
    smooth = cv2.GaussianBlur(raw, (0, 0), 1.0)
    core = (smooth >= level).astype(np.uint8)
    if not core.any():
        return 0.0
    core = cv2.morphologyEx(core, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(core, connectivity=8)
    height, width = raw.shape
    largest = 0
    for index in range(1, count):
        left, top, box_w, box_h, area = stats[index]
        if area <= largest or left == 0 or top == 0 or left + box_w >= width or top + box_h >= height:
            continue
        radius = max(2, int(np.sqrt(area) / 2))
        blob = (labels == index).astype(np.uint8)
        inner = cv2.dilate(blob, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
        outer = cv2.dilate(blob, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (4 * radius + 1,) * 2))
        annulus = outer.astype(bool) & ~inner.astype(bool)
        if annulus.any() and float(smooth[annulus].mean()) <= surround:
            largest = int(area)
    return largest / float(raw.size)
