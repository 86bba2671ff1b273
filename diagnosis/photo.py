"""Phone photos of films and screens: find the radiograph, straighten it, crop the surroundings.

Users photograph a film on a light box or against a window, a monitor or a printout. The models were
trained on digital radiographs, so before they run we look for the film (or the screen's image area):
a large convex quadrilateral whose sides lie on strong straight edges with a plain surround beyond
them (light box, bezel, viewer background, paper, wall). If one is found we warp it to an upright
rectangle at full resolution, suppress the screen-grid moiré and stretch the contrast.

Digital radiographs (DICOM, exported files) have no such border, or their content fills the frame, or
their border is exact black/white padding: they are returned untouched — the very same array — so
this step never changes what the models see for them.

Detection runs on a copy scaled to ``WORK_SIDE`` px; only the final warp touches full resolution
(~10 ms for a 1280×960 photo on the 2-core dev machine, with a training job running beside it).

Measured (python -m training measure-photos --manifest ../shared/data/xray-pack/manifest.csv ...):
digital radiographs of the test split changed: 19 / 1506 (12 hand films scanned with a visible inner
frame, 4 shoulder and 3 chest images with a dark surround); the pack's 76 real phone photos: none
changed (their senders cropped them to the film already); synthetic photos of the 1113 chest test
images (light box, window, monitor, print): film corners found within 5 % of the frame in 71 % (on
val: light box, window and print ~82 %, monitors ~44 %: a film's black margin melts into the viewer's
dark background; a film's white edge on a white light box or window leaves no edge to find).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

WORK_SIDE = 256  # detection resolution (long side): a film's border is a large structure
MIN_FILM_FRACTION = 0.05  # smaller quadrilaterals are labels and markers, not a film
MIN_FILM_SIDE = 0.12  # nor are ones with a side shorter than this (fraction of the frame's long side)
FILLS_FRAME = 0.85  # a film covering this much of the frame is left as it is: cropping gains little
EDGE_STRENGTH = 24.0  # |Sobel 3×3| across a side (after a 5×5 blur) that counts as an edge
MIN_SIDE_SUPPORT = 0.55  # fraction of a side that must lie on such an edge
MIN_MEAN_SUPPORT = 0.70
WEAK_SIDE_SUPPORT = 0.3  # a nested film may have one side this weak (bright film edge on a bright panel)
SURROUND_BAND = 0.03  # how far beyond a side (fraction of the frame) we look for a plain surround
MAX_SURROUND_TEXTURE = 10.0  # median |gradient| along the plainest line beyond a side
BORDER_TOLERANCE = 0.02  # a side this close to the frame's edge is the photo's crop, not the film's
PADDING_LEVELS = (3, 252)  # exported files pad with exact black or white; photos never reach it evenly
CONTRAST_CLIP = (0.5, 99.5)  # percentiles stretched to 0 and 255 after rectification
# Photo or digital? A phone photo has colour (cast, sensor noise) or at least this many pixels on its
# long side (the pack's 76 real photos: 410–1024 px; its digital films: 100–250 px for chest, hand,
# knee and shoulder). Only those are searched for a film: inside a small gray digital radiograph the
# search finds "films" in the anatomy (a 128 px chest film was cropped to a 127 × 51 strip).
PHOTO_MIN_SIDE = 400
# A film turned by a few degrees inside black (or white) padding: an image turned by an app, or a film
# photographed askew on a dark desk. Straightened whatever the input's size.
TILT_RANGE = (2.0, 25.0)  # degrees; below: upright enough; above: a 90° turn is the orientation head's job
MIN_TILTED_FILL = 0.95  # the content's convex hull fills its turned rectangle (a hand's silhouette does not)
MIN_TILTED_SUPPORT = 0.5  # or the content reaches the film's sides along this share of their length
TILT_INSET = 2.0  # working pixels left out at each side of a deskewed film: its blurred edge on the padding
# A digital file this dark (99th percentile of its brightness below it; real val radiographs: 0.1 %
# quantile 40) is windowed to its own range before the models read it, as a viewer's window/level
# would: on val, dark copies of films that keep at least ``_stretch``'s 16 gray levels were named
# right as often as the films themselves (``python -m training measure-quality --dark``). A dark
# *photo* is missing light, not windowing: it keeps the retake advice.
DARK_P99 = 40


@dataclass(frozen=True)
class Rectified:
    gray: np.ndarray  # what the models should see; the input array itself when untouched
    rectified: bool
    corners: np.ndarray | None  # float32 4×2 (x, y) in input pixels, TL, TR, BR, BL; None if untouched
    film_fraction: float  # fraction of the input frame covered by the radiograph (1.0 if untouched)
    # A phone photo of a film or screen (``models_view``): colour (a camera's cast and noise), or a film
    # found in it by the search. A large gray file with no film outline in it is a digital file.
    photographed: bool = False
    brightened: bool = False  # a dark digital file windowed to its own range (``DARK_P99``)


def models_view(decoded) -> Rectified:
    """What the models see of a decoded image (``diagnosis.intake.DecodedImage``): DICOM as it is;
    a film turned by a few degrees on padding straightened; a photographed film found, straightened
    and cropped; any other digital radiograph untouched. The one definition, for the service and
    for training alike."""
    if decoded.format == "DICOM":  # DICOM is digital: nothing to straighten
        return Rectified(gray=decoded.gray, rectified=False, corners=None, film_fraction=1.0)
    view = rectify(decoded.gray, photographed=may_be_photo(decoded.gray, decoded.colour))
    # Colour is a camera's; a gray picture is a photo only where a film was found in it (the pack's
    # spine, dental, hip and wrist files are 512–1024 px gray files: digital, not photos).
    view = replace(view, photographed=view.photographed or decoded.colour)
    return view if view.photographed else brighten_if_dark(view)


def brighten_if_dark(view: Rectified) -> Rectified:
    """A dark digital file windowed to its own range (``DARK_P99``); unchanged when it is not dark
    or holds too few gray levels to recover (then the quality check asks for the original file)."""
    if gray_percentiles(view.gray, 99.0)[0] >= DARK_P99:
        return view
    brighter = _stretch(view.gray)
    return view if brighter is view.gray else replace(view, gray=brighter, brightened=True)


def may_be_photo(gray: np.ndarray, colour: bool) -> bool:
    """Could this picture be a phone photo of a film or screen, so that a film is searched for in it?"""
    return colour or max(gray.shape) >= PHOTO_MIN_SIDE


def rectify(gray: np.ndarray, photographed: bool = True) -> Rectified:
    """Find, straighten and crop the radiograph in a photo; leave digital radiographs untouched.

    ``photographed=False`` (a small gray digital file): only a film turned by a few degrees inside
    padding is straightened; no film is searched for. Never raises for a uint8 2-D array: an
    unexpected OpenCV failure means "no film found".
    """
    untouched = Rectified(gray=gray, rectified=False, corners=None, film_fraction=1.0)
    try:
        corners, photo = find_tilted_film(gray), photographed
        if corners is not None:
            # The tilted outline may be a whole photo turned inside black corners: the film inside
            # the straightened photo is searched for as in any photo. Else the film itself is kept,
            # less its blurred edge on the padding.
            inner = film_inside(gray, corners) if photographed else None
            trim = TILT_INSET * max(gray.shape) / WORK_SIDE
            photo, corners = inner is not None, _inset(corners, trim) if inner is None else inner
        elif photographed:
            corners = find_film(gray)
        if corners is None:
            return untouched
        fraction = float(cv2.contourArea(corners)) / float(gray.shape[0] * gray.shape[1])
        # A film only turned back on its padding keeps its pixels' values: no contrast stretch.
        return Rectified(gray=_straighten(gray, corners, stretch=photo), rectified=True, corners=corners,
                         film_fraction=fraction, photographed=photo)
    except cv2.error:  # defensive: a degenerate quadrilateral must not break intake
        return untouched


def find_film(gray: np.ndarray) -> np.ndarray | None:
    """Corners (float32 4×2, TL, TR, BR, BL, input pixels) of the film, or None for a borderless image."""
    height, width = gray.shape
    # Always the same working size (small files are upsampled) so that thresholds mean the same thing.
    scale = WORK_SIDE / max(height, width)
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    raw = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    small = cv2.GaussianBlur(raw, (5, 5), 0)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = cv2.magnitude(gx, gy)

    frame_area = float(small.shape[0] * small.shape[1])
    judged = []  # (area, quad, per-side verdicts from _judge_sides)
    for quad in _candidates(small, magnitude):
        if not _plausible(quad):
            continue
        area = float(cv2.contourArea(quad))
        if not MIN_FILM_FRACTION * frame_area <= area <= 0.98 * frame_area:
            continue
        judged.append((area, quad, _judge_sides(quad, gx, gy, magnitude)))
    chosen = _innermost(judged, magnitude)
    if chosen is None or cv2.contourArea(chosen) >= FILLS_FRAME * frame_area or _is_padding(raw, chosen):
        return None
    return (chosen / scale).astype(np.float32)


def find_tilted_film(gray: np.ndarray) -> np.ndarray | None:
    """Corners (TL, TR, BR, BL, input pixels) of a film turned by TILT_RANGE degrees inside exact
    black or white padding, or None. Either the picture is the film turned with its canvas grown to
    hold it (an app's turn: the film's corners touch the picture's four sides), or the content's
    outline is the film's: a rectangle whose convex hull fills its minimum-area rectangle. Either
    way nothing but padding lies outside it, and the content reaches the film's sides along most of
    their length (an upright hand's silhouette on black does not)."""
    height, width = gray.shape
    scale = WORK_SIDE / max(height, width)
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    raw = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    low, high = PADDING_LEVELS
    content = ((raw > low) & (raw < high)).astype(np.uint8)
    content = cv2.morphologyEx(content, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))  # dark film areas
    content = cv2.morphologyEx(content, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # JPEG specks
    contours = cv2.findContours(content, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    (cx, cy), (w, h), angle = cv2.minAreaRect(outline)
    tilt = (angle + 45.0) % 90.0 - 45.0  # OpenCV versions differ: [-90, 0) or (0, 90]
    if not TILT_RANGE[0] <= abs(tilt) <= TILT_RANGE[1] or w * h < 0.2 * size[0] * size[1]:
        return None
    for corners in (_turned_canvas(size, tilt), _order(cv2.boxPoints(((cx, cy), (w, h), angle)).astype(np.float32))):
        if corners is None or not _is_padding(raw, corners):
            continue
        if _side_support(content, corners) >= MIN_TILTED_SUPPORT or (
                cv2.contourArea(cv2.convexHull(outline)) >= MIN_TILTED_FILL * w * h):
            return corners / scale
    return None


def _turned_canvas(size: tuple[int, int], tilt: float) -> np.ndarray | None:
    """The film whose turn by ``tilt`` degrees, with the canvas grown to hold it, gives a picture of
    ``size`` (width, height): its corners touch the picture's sides. None if no film fits."""
    width, height = size
    c, s = np.cos(np.radians(abs(tilt))), np.sin(np.radians(abs(tilt)))
    w, h = (width * c - height * s) / (c * c - s * s), (height * c - width * s) / (c * c - s * s)
    if min(w, h) < 0.1 * max(width, height):
        return None
    return _order(cv2.boxPoints(((width / 2, height / 2), (w, h), tilt)).astype(np.float32))


def _side_support(content: np.ndarray, corners: np.ndarray) -> float:
    """Share of the quadrilateral's sides along which the content reaches within a few pixels."""
    reach = cv2.dilate(content, np.ones((7, 7), np.uint8))
    height, width = content.shape
    hits = []
    for i in range(4):
        p, q = corners[i], corners[(i + 1) % 4]
        t = np.linspace(0.05, 0.95, 64, dtype=np.float32)[:, None]
        xs, ys = _pixels(p + t * (q - p), width, height)
        hits.append(reach[ys, xs] > 0)
    return float(np.mean(hits))


def _inset(corners: np.ndarray, pixels: float) -> np.ndarray:
    """The rectangle (TL, TR, BR, BL) with each side moved ``pixels`` inwards: the blurred edge
    between film and padding (the turn's interpolation, JPEG ringing) is left out."""
    tl, tr, br, bl = corners
    u = (tr - tl) / max(float(np.linalg.norm(tr - tl)), 1e-6)
    v = (bl - tl) / max(float(np.linalg.norm(bl - tl)), 1e-6)
    return np.float32([tl + pixels * (u + v), tr + pixels * (v - u), br - pixels * (u + v), bl + pixels * (u - v)])


def film_inside(gray: np.ndarray, outline: np.ndarray) -> np.ndarray | None:
    """Corners (input pixels) of the film found inside the quadrilateral ``outline`` once it is
    straightened, or None when none is found there. One warp at the end: the two steps compose into
    one quadrilateral of the input."""
    upright, matrix = _warp(gray, outline)
    inner = find_film(upright)
    if inner is None:
        return None
    back = cv2.perspectiveTransform(inner.reshape(-1, 1, 2).astype(np.float64), np.linalg.inv(matrix))
    return _order(back.reshape(4, 2).astype(np.float32))


def _candidates(small: np.ndarray, magnitude: np.ndarray) -> list[np.ndarray]:
    """Quadrilaterals around closed edge loops, regions cut out by long straight edges, and
    bright / dark regions."""
    high = max(float(np.percentile(magnitude, 90)), 2 * EDGE_STRENGTH)
    edges = cv2.Canny(small, high / 2, high, L2gradient=True)
    shapes = list(cv2.findContours(cv2.dilate(edges, np.ones((3, 3), np.uint8)), cv2.RETR_LIST,
                                   cv2.CHAIN_APPROX_SIMPLE)[0])
    shapes += _line_regions(edges)
    # A film on a bright light box / window is a dark hole, a screen's image a bright patch.
    _, bright = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = np.ones((5, 5), np.uint8)
    for mask in (bright, 255 - bright):
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        shapes += cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)[0]

    min_area = MIN_FILM_FRACTION * small.shape[0] * small.shape[1]
    quads = []
    for shape in shapes:
        if len(shape) < 4:
            continue
        hull = cv2.convexHull(shape)
        hull_area = cv2.contourArea(hull)
        if hull_area < min_area:
            continue
        # approxPolyN fits 4 sides around the hull: a corner hidden by glare or a finger is restored.
        quad = cv2.approxPolyN(hull, 4, ensure_convex=True)
        if quad is None or len(quad.reshape(-1, 2)) != 4:
            continue
        quad = _order(quad.reshape(4, 2).astype(np.float32))
        # A shape that is no quadrilateral (film merged with part of its surround) gets a loose fit.
        if cv2.contourArea(quad) <= 1.15 * hull_area:
            quads.append(quad)
    return quads


def _line_regions(edges: np.ndarray) -> list[np.ndarray]:
    """Regions enclosed by long straight edge segments (and the frame).

    A film's border is made of long straight lines even where glare, a finger or dark film content
    breaks the edge loop; anatomy rarely is. Drawing the segments, slightly extended so that corners
    close, partitions the frame; each part is a candidate.
    """
    height, width = edges.shape
    shortest = 0.2 * min(height, width)
    segments = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold=int(shortest / 2), minLineLength=shortest,
                               maxLineGap=0.03 * max(height, width))
    if segments is None:
        return []
    cuts = np.zeros_like(edges)
    cv2.rectangle(cuts, (0, 0), (width - 1, height - 1), 255, 1)
    reach = 0.06 * max(height, width)
    for x1, y1, x2, y2 in segments.reshape(-1, 4)[:64].astype(np.float32):  # (N,1,4) in 4.x, (N,4) in 5
        step = np.array([x2 - x1, y2 - y1], dtype=np.float32)
        step *= reach / max(float(np.linalg.norm(step)), 1e-6)
        start = np.rint(np.array([x1, y1]) - step).astype(int)
        end = np.rint(np.array([x2, y2]) + step).astype(int)
        cv2.line(cuts, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), 255, 2)
    return list(cv2.findContours(255 - cuts, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)[0])


def _order(points: np.ndarray) -> np.ndarray:
    """TL, TR, BR, BL (image coordinates, y down)."""
    centre = points.mean(axis=0)
    angles = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])
    points = points[np.argsort(angles)]  # clockwise on screen
    start = int(np.argmin(points.sum(axis=1)))
    return np.roll(points, -start, axis=0)


def _plausible(quad: np.ndarray) -> bool:
    """A film seen by a hand-held phone: convex, corners not too far from right angles, not a sliver."""
    if not cv2.isContourConvex(quad.reshape(-1, 1, 2)):
        return False
    for i in range(4):
        u, v = quad[i - 1] - quad[i], quad[(i + 1) % 4] - quad[i]
        cosine = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-6))
        if abs(cosine) > 0.6:  # outside ~53°..127°
            return False
    # Films are at most ~1:4 (a cropped full-spine film); lead markers and lung slivers are smaller or thinner.
    sides = np.linalg.norm(quad - np.roll(quad, -1, axis=0), axis=1)
    return float(sides.min()) >= max(0.25 * float(sides.max()), MIN_FILM_SIDE * WORK_SIDE)


def _on_frame_edge(p: np.ndarray, q: np.ndarray, width: int, height: int) -> bool:
    """Does the side p–q run along the frame's edge (the film runs out of the photo there)?"""
    tol_x, tol_y = BORDER_TOLERANCE * width + 1, BORDER_TOLERANCE * height + 1
    return bool((p[0] < tol_x and q[0] < tol_x) or (p[0] > width - 1 - tol_x and q[0] > width - 1 - tol_x)
                or (p[1] < tol_y and q[1] < tol_y) or (p[1] > height - 1 - tol_y and q[1] > height - 1 - tol_y))


def _judge_sides(quad: np.ndarray, gx: np.ndarray, gy: np.ndarray, magnitude: np.ndarray) -> list[float | None]:
    """Per side: None if it runs along the frame's edge, else its edge support, or -1 if the
    surround beyond it is not plain.

    A film's border is a straight edge along its whole length, and what lies beyond it (light box,
    bezel, viewer background, paper, wall) is smooth. A quadrilateral fitted to ribs, lungs or bones
    inside a digital radiograph fails one of the two: its sides are only partly on edges, or beyond
    them lies more anatomy (measured on val: median |gradient| 10–50 beyond such sides, 0–8 beyond
    the sides of synthetic films).
    """
    height, width = gx.shape
    centre = quad.mean(axis=0)
    band = max(int(SURROUND_BAND * max(height, width)), 3)
    verdicts: list[float | None] = []
    for i in range(4):
        p, q = quad[i], quad[(i + 1) % 4]
        if _on_frame_edge(p, q, width, height):
            verdicts.append(None)  # the film runs out of the photo here
            continue
        direction = q - p
        length = float(np.linalg.norm(direction))
        normal = np.array([-direction[1], direction[0]], dtype=np.float32) / max(length, 1e-6)
        if np.dot(normal, (p + q) / 2 - centre) < 0:
            normal = -normal  # pointing out of the film
        t = np.linspace(0.1, 0.9, max(int(length / 2), 8), dtype=np.float32)[:, None, None]
        # Sample lines parallel to the side at several offsets in one go: (points, offsets, xy).
        offsets = np.arange(-2, 3 + band, dtype=np.float32)[None, :, None]
        xs, ys = _pixels(p + t * direction + offsets * normal, width, height)
        # Edge: the fitted side may sit a pixel or two off the film's edge.
        across = np.abs(gx[ys[:, :5], xs[:, :5]] * normal[0] + gy[ys[:, :5], xs[:, :5]] * normal[1]).max(axis=1)
        # Surround: the plainest line parallel to the side just beyond it (from 3 px out), so that
        # another edge close by (a narrow paper margin, the light box's own border) cannot hide it.
        surround = float(np.median(magnitude[ys[:, 5:], xs[:, 5:]], axis=0).min())
        verdicts.append(float(np.mean(across >= EDGE_STRENGTH)) if surround <= MAX_SURROUND_TEXTURE else -1.0)
    return verdicts


def _film_like(verdicts: list[float | None], allowed_failures: int = 0) -> bool:
    """At least two opposite sides are real edges (else a corner of a lung would pass), and all of
    them, save ``allowed_failures`` weakly supported ones, are well supported."""
    free = [v for v in verdicts if v is not None]
    good = [v for v in free if v >= MIN_SIDE_SUPPORT]
    weak = [v for v in free if WEAK_SIDE_SUPPORT <= v < MIN_SIDE_SUPPORT]
    sides = [i for i, v in enumerate(verdicts) if v is not None]
    if len(sides) < 2 or (len(sides) == 2 and sides[1] - sides[0] != 2):
        return False
    return (len(good) + min(len(weak), allowed_failures) == len(free) and len(good) >= 2
            and float(np.mean(good)) >= MIN_MEAN_SUPPORT)


def _innermost(judged: list[tuple[float, np.ndarray, list[float | None]]],
               magnitude: np.ndarray) -> np.ndarray | None:
    """The largest film-like quadrilateral, then repeatedly the largest one nested in it.

    A light box's panel contains the film; a monitor's bezel contains the viewer, which contains
    the image; a sheet of paper contains the print. The film is the innermost large one, and the ring
    between it and its container is plain (panel, viewer background, paper), not anatomy. Inside an
    accepted outline one side may be weak (the film's bright edge against a bright panel).
    """
    judged = sorted(judged, key=lambda item: -item[0])
    outer = [(area, quad, verdicts) for area, quad, verdicts in judged if _film_like(verdicts)]
    if not outer:
        return None
    area, chosen = _best_fit(outer, magnitude.shape)
    tolerance = 0.02 * max(magnitude.shape)  # two fits of the same edge differ by a pixel or two
    while True:
        nested = [(a, q, verdicts) for a, q, verdicts in judged
                  if 0.25 * area <= a <= 0.95 * area and _film_like(verdicts, 1) and _inside(q, chosen, tolerance)
                  and _plain_ring(chosen, q, magnitude)]
        if not nested:
            return chosen
        strict = [item for item in nested if _film_like(item[2])]
        area, chosen = _best_fit(strict or nested, magnitude.shape)


def _best_fit(judged: list[tuple[float, np.ndarray, list[float | None]]],
              shape: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """Of the largest quadrilateral and its near-duplicates (fits of the same outline from different
    candidate sources), the one whose sides lie best on edges: a loose fit has a corner astray."""
    _, largest, _ = judged[0]
    near = [item for item in judged if float(np.abs(item[1] - largest).max()) <= 0.12 * max(shape)]
    area, quad, _ = max(near, key=lambda item: (np.mean([v for v in item[2] if v is not None]), item[0]))
    return area, quad


def _plain_ring(outer: np.ndarray, inner: np.ndarray, magnitude: np.ndarray) -> bool:
    ring = np.zeros(magnitude.shape, np.uint8)
    cv2.fillConvexPoly(ring, np.rint(outer).astype(np.int32), 1)
    cv2.fillConvexPoly(ring, np.rint(inner).astype(np.int32), 0)
    ring = cv2.erode(ring, np.ones((5, 5), np.uint8)) > 0  # leave out both outlines' own edges
    return not ring.any() or float(np.median(magnitude[ring])) <= MAX_SURROUND_TEXTURE


def _inside(quad: np.ndarray, outer: np.ndarray, tolerance: float) -> bool:
    contour = outer.reshape(-1, 1, 2)
    return all(cv2.pointPolygonTest(contour, (float(x), float(y)), True) >= -tolerance for x, y in quad)


def _is_padding(raw: np.ndarray, quad: np.ndarray) -> bool:
    """Is everything outside the quadrilateral exact black or white? That is an exported file's
    letterbox padding, not a photo's surround (camera noise and JPEG never keep it that even)."""
    outside = np.ones(raw.shape, np.uint8)
    cv2.fillConvexPoly(outside, np.rint(quad).astype(np.int32), 0)
    outside = cv2.erode(outside, np.ones((5, 5), np.uint8)) > 0  # skip the blurred border itself
    values = raw[outside]
    if values.size == 0:
        return False
    low, high = PADDING_LEVELS
    return bool(np.mean((values <= low) | (values >= high)) >= 0.97)


def _pixels(points: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    xy = np.rint(points).astype(np.int32)
    return np.clip(xy[..., 0], 0, width - 1), np.clip(xy[..., 1], 0, height - 1)


def _warp(gray: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quadrilateral ``corners`` (TL, TR, BR, BL) warped to an upright rectangle at full
    resolution, and the 3×3 matrix from input pixels to the rectangle's."""
    tl, tr, br, bl = corners
    width = round(float(max(np.linalg.norm(tr - tl), np.linalg.norm(br - bl))))
    height = round(float(max(np.linalg.norm(bl - tl), np.linalg.norm(br - tr))))
    width, height = max(width, 2), max(height, 2)
    target = np.float32([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]])
    matrix = cv2.getPerspectiveTransform(corners.astype(np.float32), target)
    warped = cv2.warpPerspective(gray, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return warped, matrix


def _straighten(gray: np.ndarray, corners: np.ndarray, stretch: bool = True) -> np.ndarray:
    """Warp the film to an upright rectangle at full resolution, then de-moiré and stretch contrast."""
    film, _ = _warp(gray, corners)
    height, width = film.shape
    # A screen's pixel grid photographed by a phone leaves a fine periodic pattern (a period of a few
    # px). A blur growing with the image size removes it (for the models and the overlay) while
    # staying below the detail that survives the models' ≤ 256 px input. Coarse moiré bands, the
    # grid's beat with the sensor, stay: removing them would need a notch filter in the spectrum.
    sigma = min(max(width, height) / 1024.0, 2.0)
    if sigma >= 0.5:
        film = cv2.GaussianBlur(film, (0, 0), sigma)
    return _stretch(film) if stretch else film


def gray_percentiles(gray: np.ndarray, *percents: float) -> list[int]:
    """Gray levels at these percentiles of a uint8 image (from its histogram: fast at full size);
    shared with ``quality.quality_metrics``."""
    histogram = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
    cumulative = np.cumsum(histogram) / max(float(histogram.sum()), 1.0)
    return [int(np.searchsorted(cumulative, percent / 100.0)) for percent in percents]


def _stretch(gray: np.ndarray) -> np.ndarray:
    """Linear contrast stretch between robust percentiles: washed-out photos → full 0–255 range."""
    low, high = gray_percentiles(gray, *CONTRAST_CLIP)
    if high - low < 16:  # nearly flat: stretching would only amplify noise
        return gray
    lut = np.clip((np.arange(256, dtype=np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    return cv2.LUT(gray, lut)
