"""One finding per image: the signed class evidence over the radiograph, with a colour legend (OpenCV).

What a phone shows: Telegram displays photos at ≤ 1280 px and scales them to the screen's width,
so every overlay has its longest side between ``MIN_SIDE`` and ``MAX_SIDE`` (small digital images
are enlarged, large films reduced) and the legend is sized as a share of the image's width, which
keeps it the same size on screen whatever the film's resolution.

Colours (the maps come from ``diagnosis.heatmap.class_evidence``, in [-1, 1]): red where a region
raised the finding's estimate, blue where it lowered it; the colour's strength grows with the
region's share (opacity ALPHA·|evidence|^GAMMA: the strongest region of the film at ``ALPHA``),
and regions that did not matter keep the plain film. The legend under the film is a bar from blue ("−") through the
grey film to red ("+"). No words are drawn into the image: its title and the meaning of the
colours go in the caption, in the user's language (``diagnosis.messages.overlay_caption``).

All per-pixel work is OpenCV (C++): ``resize``, ``applyColorMap`` with a two-hue look-up table,
``addWeighted``, then ``multiply``/``add`` with the per-pixel strength, ``imencode`` for the JPEG.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

MAX_SIDE = 1280  # Telegram shows photos at ≤ 1280 px; larger overlays only cost time and bytes
MIN_SIDE = 768  # small digital images (e.g. 256 px) are enlarged so a phone screen shows the map
ALPHA = 0.5  # opacity of the colour where the evidence is strongest: the film stays readable under it
GAMMA = 1.5  # opacity ∝ |evidence|^GAMMA: weak evidence stays faint, so the film is not washed in colour
JPEG_QUALITY = 88
LEGEND_SHARE = 0.075  # legend strip height as a share of the image width (≈ 5 mm on a phone)
LEGEND_MIN_PX = 36
RED_BGR = (40, 40, 235)
BLUE_BGR = (235, 110, 20)


@cache
def evidence_lut() -> np.ndarray:
    """256-entry BGR look-up table for ``cv2.applyColorMap``: index 0 = −1 (blue) … 255 = +1 (red).

    The hue carries the sign; the strength comes from the blend weight (``opacity_lut``), so each
    half of the table is one saturated hue."""
    lut = np.zeros((256, 1, 3), np.uint8)
    lut[:128, 0] = BLUE_BGR
    lut[128:, 0] = RED_BGR
    return lut


@cache
def opacity_lut() -> np.ndarray:
    """|index − 128| (0…128) → blend weight · 255 for ``cv2.LUT``: (|evidence|)^GAMMA, monotone."""
    magnitude = np.minimum(np.arange(256) / 127.5, 1.0)
    return np.round(255 * magnitude ** GAMMA).astype(np.uint8)


def legend_height(width: int) -> int:
    return max(LEGEND_MIN_PX, round(width * LEGEND_SHARE))


def display_size(width: int, height: int) -> tuple[int, int]:
    """The film's (width, height) on the overlay: longest side clamped into [MIN_SIDE, MAX_SIDE],
    aspect kept, and small enough that the film plus the legend strip stays within MAX_SIDE."""
    longest = max(width, height)
    scale = min(max(longest, MIN_SIDE), MAX_SIDE) / longest
    scale = min(scale, MAX_SIDE / (height + LEGEND_SHARE * width), (MAX_SIDE - LEGEND_MIN_PX) / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_film(gray: np.ndarray) -> np.ndarray:
    """The radiograph (uint8, 2-D) at display size, as BGR: computed once for all of its overlays."""
    height, width = gray.shape[:2]
    size = display_size(width, height)
    if size != (width, height):
        shrinking = size[0] < width
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def _upsample(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """Signed map (e.g. 4×4, in [-1, 1]) → uint8 index at display size (0 = −1, 128 ≈ 0, 255 = +1).

    Smooth: bicubic to 1/8 of the display size in float, then bilinear on the uint8 index (cheap)."""
    small = (max(2, width // 8), max(2, height // 8))
    heat = cv2.resize(heatmap.astype(np.float32), small, interpolation=cv2.INTER_CUBIC)
    # Bicubic overshoots: keep within the map's own range, so a map without red never gains red rings.
    low, high = max(float(heatmap.min()), -1.0), min(float(heatmap.max()), 1.0)
    index = cv2.convertScaleAbs(np.clip(heat, low, high), alpha=127.5, beta=127.5)
    return cv2.resize(index, (width, height), interpolation=cv2.INTER_LINEAR)


def _legend(width: int, background: int = 128) -> np.ndarray:
    """A strip: "−" sign, the colour bar as it looks on a mid-grey film (−1 … 0 … +1), "+" sign."""
    strip_h = legend_height(width)
    strip = np.zeros((strip_h, width, 3), np.uint8)
    margin = strip_h  # room for the signs
    bar_w, bar_h = width - 2 * margin, max(10, strip_h // 2)
    top = (strip_h - bar_h) // 2
    values = np.linspace(0, 255, bar_w).round().astype(np.uint8)[None, :].repeat(bar_h, axis=0)
    base = np.full((bar_h, bar_w, 3), background, np.uint8)
    strip[top:top + bar_h, margin:margin + bar_w] = _blend(base, values)
    centre = margin + bar_w // 2
    thick = max(2, strip_h // 12)
    cv2.line(strip, (centre, top - thick), (centre, top + bar_h + thick), (255, 255, 255), max(1, thick // 2))
    # The signs drawn as strokes (no font, no words): "−" left of the bar, "+" right of it.
    arm, mid_y = strip_h // 3, strip_h // 2
    for x_mid in (margin // 2, width - margin // 2):
        cv2.line(strip, (x_mid - arm, mid_y), (x_mid + arm, mid_y), (255, 255, 255), thick, cv2.LINE_AA)
    x_plus = width - margin // 2
    cv2.line(strip, (x_plus, mid_y - arm), (x_plus, mid_y + arm), (255, 255, 255), thick, cv2.LINE_AA)
    return strip


def _blend(film: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Colour by sign (look-up table), opacity ALPHA·|evidence| per pixel over the film (uint8 index)."""
    coloured = cv2.applyColorMap(index, evidence_lut())
    tinted = cv2.addWeighted(coloured, ALPHA, film, 1.0 - ALPHA, 0.0)  # full-strength colour
    weight = cv2.LUT(cv2.absdiff(index, 128), opacity_lut())  # |evidence|^GAMMA · 255
    weight = cv2.merge([weight, weight, weight])
    return cv2.add(cv2.multiply(tinted, weight, scale=1 / 255),
                   cv2.multiply(film, cv2.bitwise_not(weight), scale=1 / 255))


def render_overlay(film: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """One finding over ``film`` (BGR from ``fit_film``): the blended image with the legend below.

    ``heatmap``: signed evidence in [-1, 1] at any resolution (maps in [0, 1], e.g. Grad-CAM's,
    show red only)."""
    height, width = film.shape[:2]
    blended = _blend(film, _upsample(heatmap, width, height))
    return np.vstack([blended, _legend(width)])


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG (Telegram re-encodes photos as JPEG anyway; ~20x faster to encode than PNG at 1280 px)."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buffer.tobytes()


def render_overlays(gray: np.ndarray, heatmaps: list[np.ndarray]) -> list[bytes]:
    """One JPEG per heatmap over the same radiograph (resized once)."""
    film = fit_film(gray)
    return [encode_jpeg(render_overlay(film, heatmap)) for heatmap in heatmaps]
