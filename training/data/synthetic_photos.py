"""Turn digital radiographs into realistic phone photos of a film or screen (issue #7).

Users photograph a film on a light box, a film held to a window, a monitor or a printout. Each
synthetic photo places the radiograph on one of those surrounds, then applies what a phone adds:
perspective, glare, a colour cast, moiré (screens), blur, sensor noise and JPEG re-encoding.
Everything is drawn from the ``numpy.random.Generator`` passed in, so a seed fixes the set.

``sent=True`` (``--sent``) adds what happens between the camera and the service, as in the pack's
real photos (76 spine films, 58 of them through WhatsApp: cropped by the sender to the film, often
narrow, ≤ 1024 px): the sender's crop to the film (a few per cent of light box left, or the film's
edge cut off: a partial film), sometimes a finger holding the film at an edge, and a messenger's
re-compression (scaled to ≤ 1024 px on the long side, JPEG quality 50–80). Its draws come after the
photo's own, so a seed gives the same photo underneath with or without it. Quarter turns are left to
the measurement (``measure-routing --angles``) and to training (``train --quarter-turns``), which
know the turn and can undo or label it.

    python -m training synthetic-photos --manifest CSV --split test --out DIR --seed 0 [--limit N] \\
        [--workers N] [--sent]

writes ``DIR/images/*.jpg`` and ``DIR/manifest.csv`` in the pack's format (phone_photo=1, paths
relative to DIR) plus ``DIR/corners.csv`` with where each film was placed: a robustness test set
and a source for training augmentation. Image i is drawn from the seed ``(seed, i)``, so the set is
the same whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .datasets import SYNTHETIC_PREFIX

SCENES = ("lightbox", "window", "monitor", "printout")


def to_gray(photo: np.ndarray) -> np.ndarray:
    """RGB → 8-bit gray exactly as ``diagnosis.intake`` converts colour images (PIL's "L", ITU-R 601-2)."""
    if photo.ndim == 2:
        return photo
    return np.asarray(Image.fromarray(photo, mode="RGB").convert("L"), dtype=np.uint8)


def synthesise(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A phone photo (RGB uint8) of the radiograph ``gray`` (uint8 H×W)."""
    return synthesise_with_corners(gray, rng)[0]


def synthesise_with_corners(gray: np.ndarray, rng: np.random.Generator, scene: str | None = None,
                            fraction: tuple[float, float] = (0.30, 0.80),
                            glare: bool | None = None, sent: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The photo and the film's corners in it (float32 4×2, x/y, order TL, TR, BR, BL).

    ``scene`` picks the surround (default: drawn at random); ``fraction`` the range of the frame's
    area the film covers before perspective (small values make "film too small in frame" cases);
    ``glare``: None = 0–2 soft reflections at random (the training photos), False = none, True = a
    lamp's specular reflection on the film (a small saturated core with a soft halo) besides those.
    ``sent``: then cropped by the sender, perhaps held by a finger, and re-compressed by a messenger
    (``_as_sent``); the corners are then in the sent picture's pixels and may lie outside it (a
    partial film).
    """
    scene = scene or SCENES[int(rng.integers(len(SCENES)))]
    film_h, film_w = gray.shape
    # The photo's orientation follows the film's, as people hold the phone to fit the film.
    long_side = int(rng.integers(640, 1281))
    short_side = long_side * 3 // 4
    photo_w, photo_h = (long_side, short_side) if film_w > film_h * 1.1 else (short_side, long_side)

    # Film size: a fraction of the frame's area before perspective, keeping the film's aspect ratio.
    area = rng.uniform(*fraction)
    scale = np.sqrt(area * photo_w * photo_h / (film_w * film_h))
    scale = min(scale, 0.92 * photo_w / film_w, 0.92 * photo_h / film_h)
    width, height = max(int(film_w * scale), 8), max(int(film_h * scale), 8)
    film = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    film = film.astype(np.float32) / 255.0

    # The plane the film lies in (light box, screen, paper), drawn flat, then seen in perspective.
    left = (photo_w - width) / 2 + rng.uniform(-0.3, 0.3) * (photo_w - width)
    top = (photo_h - height) / 2 + rng.uniform(-0.3, 0.3) * (photo_h - height)
    plane, room = _scene_plane(scene, (photo_h, photo_w), film, (left, top), rng)
    flat = np.float32([[left, top], [left + width, top], [left + width, top + height], [left, top + height]])
    corners = _perspective_corners(flat, (photo_w, photo_h), rng)
    homography = cv2.getPerspectiveTransform(flat, corners)
    seen = cv2.warpPerspective(plane, homography, (photo_w, photo_h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    photo = np.where(seen < 0, room, seen)

    photo = _light(photo, seen >= 0, scene, rng, glare)
    rgb = _colour(photo, scene, rng)
    if glare:
        rgb = _specular(rgb, corners, rng)
    rgb = _camera(rgb, rng)
    return _as_sent(rgb, corners, rng) if sent else (rgb, corners)


def _as_sent(rgb: np.ndarray, corners: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The sender's crop to the film, sometimes a finger at an edge, a messenger's re-compression."""
    height, width = rgb.shape[:2]
    low, high = corners.min(axis=0), corners.max(axis=0)
    extent = high - low
    # Each side: a little of the surround left (up to 6 % of the film) or the film cut (up to 6 %).
    margins = rng.uniform(-0.06, 0.06, size=4) * np.r_[extent, extent]
    x0, y0 = np.maximum(np.floor(low - margins[:2]), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(high + margins[2:]), [width, height]).astype(int)
    if x1 - x0 < 16 or y1 - y0 < 16:  # defensive: a degenerate film keeps the whole frame
        x0, y0, x1, y1 = 0, 0, width, height
    picture = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    corners = (corners - np.float32([x0, y0])).astype(np.float32)
    if rng.random() < 0.3:
        picture = _finger(picture, rng)
    scale = min(1.0, 1024.0 / max(picture.shape[:2]))
    if scale < 1.0:
        size = (max(round(picture.shape[1] * scale), 1), max(round(picture.shape[0] * scale), 1))
        picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
        corners = (corners * scale).astype(np.float32)
    return _jpeg(picture, int(rng.integers(50, 81))), corners


def _finger(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fingertip holding the film: a rounded, shaded, skin-coloured bar entering from one edge."""
    height, width = rgb.shape[:2]
    short = min(height, width)
    thickness = rng.uniform(0.08, 0.16) * short
    length = rng.uniform(0.12, 0.30) * short
    edge = int(rng.integers(4))  # the side the hand is on: left, top, right, bottom
    along = rng.uniform(0.15, 0.85)
    start = [(0.0, along * height), (along * width, 0.0), (width - 1.0, along * height),
             (along * width, height - 1.0)][edge]
    inward = np.deg2rad([0.0, 90.0, 180.0, 270.0][edge] + rng.uniform(-30, 30))
    tip = (start[0] + length * np.cos(inward), start[1] + length * np.sin(inward))
    # Distance of every pixel to the finger's axis (a segment): a capsule, shaded like a cylinder.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ax, ay = tip[0] - start[0], tip[1] - start[1]
    t = np.clip(((xx - start[0]) * ax + (yy - start[1]) * ay) / max(ax * ax + ay * ay, 1e-6), 0.0, 1.0)
    distance = np.hypot(xx - (start[0] + t * ax), yy - (start[1] + t * ay)) / (thickness / 2)
    inside = np.clip((1.0 - distance) * thickness / 3, 0.0, 1.0)  # soft edge of ~1.5 px per 10 px thick
    shade = np.sqrt(np.clip(1.0 - distance**2, 0.0, 1.0))  # lit from the front, darker at the sides
    skin = np.asarray([rng.uniform(150, 235), rng.uniform(100, 180), rng.uniform(80, 150)], dtype=np.float32)
    finger = skin[None, None, :] * (0.55 + 0.45 * shade[..., None])
    alpha = inside[..., None]
    return np.clip(rgb.astype(np.float32) * (1 - alpha) + finger * alpha, 0, 255).astype(np.uint8)


def _scene_plane(scene: str, shape: tuple[int, int], film: np.ndarray, origin: tuple[float, float],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Brightness (0–1, float32) of the flat plane with the film on it, and of the room behind it."""
    photo_h, photo_w = shape
    yy, xx = np.mgrid[0:photo_h, 0:photo_w].astype(np.float32)
    # The room: a dim wall or desk with a gentle gradient and some texture.
    room = rng.uniform(0.05, 0.45) + rng.uniform(-0.1, 0.1) * (xx / photo_w) + rng.uniform(-0.1, 0.1) * (yy / photo_h)
    room = room + cv2.GaussianBlur(rng.normal(0, 0.04, shape).astype(np.float32), (0, 0), 6)
    plane = np.full(shape, -1.0, dtype=np.float32)  # -1 = outside the plane: the room shows
    height, width = film.shape
    left, top = round(float(origin[0])), round(float(origin[1]))
    margin = rng.uniform(0.03, 0.25)

    def panel(value: float, extra: float) -> tuple[slice, slice]:
        pad_x, pad_y = int(width * extra), int(height * extra)
        rows = slice(max(top - pad_y, 0), min(top + height + pad_y, photo_h))
        cols = slice(max(left - pad_x, 0), min(left + width + pad_x, photo_w))
        plane[rows, cols] = value
        return rows, cols

    if scene == "lightbox":
        # Film is a transparency: what is seen is the panel's light times the film's transmission.
        light = rng.uniform(0.85, 1.0)
        panel(light, margin)
        image = film * light
    elif scene == "window":
        # Daylight behind the film: bright, often blown-out sky, no panel edge.
        plane[:] = np.clip(rng.uniform(0.8, 1.0) + 0.15 * (1 - yy / photo_h), 0, 1.05)
        image = film * rng.uniform(0.8, 1.0)
    elif scene == "monitor":
        panel(rng.uniform(0.02, 0.08), margin + 0.08)  # bezel
        panel(rng.uniform(0.08, 0.25), margin)  # viewer's dark UI around the image
        image = rng.uniform(0.03, 0.08) + film * rng.uniform(0.75, 0.95)  # screens never reach black
    else:  # printout: a paper print on a desk
        panel(rng.uniform(0.75, 0.95), margin * 0.6)
        image = 0.05 + film * 0.85
    plane[top:top + height, left:left + width] = image[: photo_h - top, : photo_w - left]
    return plane, room


def _perspective_corners(flat: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Corners of the film seen from a hand-held phone: a small rotation and up to ~10 % keystone."""
    centre = flat.mean(axis=0)
    angle = np.deg2rad(rng.uniform(-6, 6))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=np.float32)
    extent = flat.max(axis=0) - flat.min(axis=0)
    jitter = rng.uniform(-0.08, 0.08, size=(4, 2)) * extent
    corners = (flat - centre) @ rotation.T + centre + jitter
    # Keep the whole film in the frame (users are asked to photograph the whole film).
    lo = np.float32([0.02, 0.02]) * np.float32(size)
    hi = np.float32(size) - 1 - lo
    shift = np.clip(corners.min(axis=0), lo, None) - corners.min(axis=0)
    shift += np.clip(corners.max(axis=0) + shift, None, hi) - (corners.max(axis=0) + shift)
    return np.clip(corners + shift, lo, hi).astype(np.float32)


def _light(photo: np.ndarray, plane: np.ndarray, scene: str, rng: np.random.Generator,
           glare: bool | None = None) -> np.ndarray:
    """Uneven lighting, exposure, glare and (on screens) moiré, in linear-ish brightness."""
    height, width = photo.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    radius = np.hypot(xx - cx, yy - cy) / np.hypot(width, height)
    photo = photo * (1.0 - rng.uniform(0.0, 0.35) * radius**2)  # vignetting / uneven light
    photo = photo * rng.uniform(0.8, 1.15)  # exposure
    if scene == "monitor" or rng.random() < 0.1:
        # Screen-door grid beating against the sensor: fine gratings at two close frequencies.
        period = rng.uniform(2.5, 6.0)
        theta = rng.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        beat = rng.uniform(0.95, 1.05)
        pattern = np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * u * beat / period)
        photo = photo + rng.uniform(0.02, 0.05) * pattern * plane  # only the screen / film plane
    for _ in range(int(rng.integers(0, 3)) if glare is not False else 0):
        # Reflection of a lamp or window: a soft bright spot, strong enough to clip in its centre.
        gx, gy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        sx, sy = rng.uniform(0.02, 0.07) * width, rng.uniform(0.02, 0.07) * height
        photo = photo + rng.uniform(0.2, 0.7) * np.exp(-(((xx - gx) / sx) ** 2 + ((yy - gy) / sy) ** 2) / 2)
    gamma = rng.uniform(0.8, 1.25)  # phone tone curves
    return np.clip(photo, 0, 1) ** gamma


def _specular(rgb: np.ndarray, corners: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lamp's specular reflection on the glossy film: white light added to every channel (so the
    sensor clips to white in its core) with a soft halo, somewhere inside the film, its core 1.5–5 %
    of the film's side."""
    height, width = rgb.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gx, gy = rng.dirichlet(np.full(4, 3.0)) @ corners
    side = float(np.hypot(*(corners[2] - corners[0]))) / np.sqrt(2)
    sigma = rng.uniform(0.015, 0.05) * side
    aspect = rng.uniform(0.6, 1.6)
    spot = np.exp(-(((xx - gx) / (sigma * aspect)) ** 2 + ((yy - gy) / (sigma / aspect)) ** 2) / 2)
    added = rgb.astype(np.float32) + rng.uniform(0.8, 1.5) * 255.0 * spot[..., None]
    return np.clip(added, 0, 255).astype(np.uint8)


def _colour(photo: np.ndarray, scene: str, rng: np.random.Generator) -> np.ndarray:
    """Gray brightness → RGB with the cast of the light source (cool screens, warm lamps)."""
    casts = {"monitor": (0.85, 0.95, 1.1), "lightbox": (0.95, 1.0, 1.08), "window": (0.95, 1.0, 1.05),
             "printout": (1.08, 1.0, 0.85)}
    gains = np.asarray(casts[scene], dtype=np.float32) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    rgb = photo[..., None] * gains[None, None, :]
    return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)


def _camera(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Defocus or hand shake, sensor noise, JPEG re-encoding."""
    image = rgb.astype(np.float32)
    sigma = rng.uniform(0.0, 1.5)
    if rng.random() < 0.2:  # hand shake: a short line kernel
        length = int(rng.integers(3, 8))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        image = cv2.filter2D(image, -1, kernel / max(kernel.sum(), 1e-6))
    elif sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = image + rng.normal(0, rng.uniform(1.0, 4.0), image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return _jpeg(image, int(rng.integers(55, 93)))


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """An RGB picture after a JPEG round trip at ``quality`` (a camera's or a messenger's)."""
    ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
        return rgb
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training synthetic-photos", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="the pack's manifest.csv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="output folder (images/ + manifest.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="at most N images")
    parser.add_argument("--body-part", default=None, help="only this body part (e.g. chest)")
    parser.add_argument("--workers", type=int, default=1, help="processes (about 60 ms per photo each)")
    parser.add_argument("--per-source", type=int, default=None, help="at most N images of each source")
    parser.add_argument("--negatives", action="store_true",
                        help="photograph non-X-ray images too (the gate must not learn 'light box = X-ray')")
    parser.add_argument("--sent", action="store_true",
                        help="as sent through a messenger: cropped by the sender, perhaps a finger, re-compressed")
    args = parser.parse_args(argv)

    manifest = Path(args.manifest)
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        # Digital images only: photographing a phone photo again teaches nothing new.
        rows = [r for r in reader if r["split"] == args.split and r.get("phone_photo") != "1"
                and (r["is_xray"] == "1" or args.negatives)
                and (args.body_part is None or r["body_part"] == args.body_part)]
    if args.per_source:
        taken: Counter[str] = Counter()
        kept = []
        for row in rows:
            taken[row["source"]] += 1
            if taken[row["source"]] <= args.per_source:
                kept.append(row)
        rows = kept
    rows = rows[: args.limit] if args.limit else rows
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(manifest.parent / row["path"], out / f"images/{index:05d}_{Path(row['path']).stem}.jpg",
             (args.seed, index), args.sent) for index, row in enumerate(rows)]
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            placed = pool.map(_photograph, jobs, chunksize=8)
    else:
        placed = [_photograph(job) for job in jobs]
    with (out / "manifest.csv").open("w", newline="") as m_handle, \
            (out / "corners.csv").open("w", newline="") as c_handle:
        writer = csv.DictWriter(m_handle, fieldnames=fields)
        writer.writeheader()
        corners_writer = csv.writer(c_handle)
        corners_writer.writerow(["path", "x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3"])
        for row, (_, target, _, _), corners in zip(rows, jobs, placed, strict=True):
            name = target.relative_to(out).as_posix()
            kind = "phone_photo_of_film" if row["is_xray"] == "1" else row["kind"]
            writer.writerow({**row, "path": name, "source": SYNTHETIC_PREFIX + row["source"], "phone_photo": "1",
                             "kind": kind})
            corners_writer.writerow([name, *np.round(corners.ravel(), 1)])
    print(f"wrote {len(rows)} synthetic photos to {out}", file=sys.stderr)
    return 0


def _photograph(job: tuple[Path, Path, tuple[int, int], bool]) -> np.ndarray:
    """Write one synthetic photo; return where the film's corners landed."""
    source, target, seed, sent = job
    gray = np.asarray(Image.open(source).convert("L"), dtype=np.uint8)
    photo, corners = synthesise_with_corners(gray, np.random.default_rng(seed), sent=sent)
    Image.fromarray(photo).save(target, quality=90)
    return corners
