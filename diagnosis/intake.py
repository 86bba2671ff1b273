"""Bytes → 8-bit grayscale image. The one door every image comes through.

Formats (``contract.formats``) are detected from content, never from a file name. Anything we cannot or will not decode
raises ``ImageRejected`` whose ``code`` maps to a message that is safe to show a user: it never
carries a stack trace, a path or DICOM patient data.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from contract.formats import PIL_FORMATS
from contract.keys import TELEGRAM_DOWNLOAD_LIMIT

MAX_INPUT_BYTES = TELEGRAM_DOWNLOAD_LIMIT  # what a bot can download is what we accept (CLI too)
MAX_PIXELS = 40_000_000  # ~ 6300×6300; a decompression bomb stops here, before decoding
MIN_SIDE = 64

# Pillow's own bomb check warns above MAX_IMAGE_PIXELS and raises at twice that; ours runs first.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageRejected(Exception):
    """The input is not an image we can analyse. ``code`` selects the user-facing message."""

    CODES = ("empty", "too_large", "unsupported", "corrupt", "too_small", "too_many_pixels", "no_pixels", "unreadable")

    def __init__(self, code: str):
        if code not in self.CODES:
            raise ValueError(f"unknown rejection code {code!r}")
        super().__init__(code)
        self.code = code


CHROMA_MIN = 2.0  # mean |R−G| + |G−B| of a colour picture with visible colour: a phone camera's cast/noise

@dataclass(frozen=True)
class DecodedImage:
    gray: np.ndarray  # uint8, H×W, display orientation (EXIF applied, MONOCHROME1 inverted)
    format: str  # Pillow's name of a format of contract.formats.PIL_FORMATS, or DICOM
    # The file held real colour (a camera's cast and noise); digital radiographs are gray even when
    # saved as RGB (all 76 real phone photos of the pack are colour, 74 of them above CHROMA_MIN).
    colour: bool = False


def decode(data: bytes) -> DecodedImage:
    """Decode image bytes into an 8-bit grayscale array, or raise ``ImageRejected``."""
    if not data:
        raise ImageRejected("empty")
    if len(data) > MAX_INPUT_BYTES:
        raise ImageRejected("too_large")
    if _looks_like_dicom(data):
        gray, fmt, colour = _decode_dicom(data), "DICOM", False
    else:
        gray, fmt, colour = _decode_pil(data)
    if gray.ndim != 2:  # never let an odd shape through as another exception
        raise ImageRejected("corrupt")
    height, width = gray.shape
    if min(height, width) < MIN_SIDE:
        raise ImageRejected("too_small")
    return DecodedImage(gray=np.ascontiguousarray(gray), format=fmt, colour=colour)


def _looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _check_pixels(width: int, height: int, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt")
    if width * height * max(frames, 1) > MAX_PIXELS or width * height > MAX_PIXELS:
        raise ImageRejected("too_many_pixels")


def _decode_pil(data: bytes) -> tuple[np.ndarray, str, bool]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            fmt = image.format or "unknown"
            _check_pixels(*image.size)
            image.seek(0)  # multi-page TIFF / animated WebP: first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return _pil_to_gray(image), fmt, _has_colour(image)
    except ImageRejected:
        raise
    except Image.UnidentifiedImageError:
        raise ImageRejected("unsupported") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("too_many_pixels") from None
    except Exception:  # truncated, malformed or hostile files: one typed error, no details
        raise ImageRejected("corrupt") from None


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _scale_to_uint8(np.asarray(image, dtype=np.float64))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    # ITU-R 601-2 luma, as PIL's "L" conversion: colour → 8-bit grayscale as in the paper.
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _has_colour(image: Image.Image) -> bool:
    if image.mode not in ("RGB", "RGBA", "P", "PA", "YCbCr", "CMYK", "LAB", "HSV"):
        return False
    small = image.convert("RGB")
    small.thumbnail((256, 256))  # cheap: the measure is a mean over the picture
    rgb = np.asarray(small, dtype=np.int16)
    chroma = np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
    return float(chroma.mean()) >= CHROMA_MIN


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _decode_dicom(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in dataset and "FloatPixelData" not in dataset:
            raise ImageRejected("no_pixels")
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        _check_pixels(int(dataset.Columns), int(dataset.Rows), frames)
        pixels = dataset.pixel_array
        # First frame: of a declared multi-frame image, and of one whose frames pydicom infers from
        # the length of the pixel data (NumberOfFrames missing or wrong) — found by fuzzing.
        samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
        frame_dims = 3 if samples > 1 else 2
        while pixels.ndim > frame_dims:
            pixels = pixels[0]
        if pixels.ndim != frame_dims:
            raise ImageRejected("corrupt")
        photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
        if pixels.ndim == 3:  # colour DICOM (pydicom converts YBR to RGB): luma
            pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        else:
            pixels = apply_modality_lut(pixels, dataset)
            pixels = apply_voi_lut(pixels, dataset, index=0)
        gray = _scale_to_uint8(np.asarray(pixels, dtype=np.float64))
        if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
            gray = 255 - gray
        return gray
    except ImageRejected:
        raise
    except Exception:  # unsupported transfer syntax, truncated pixel data, broken tags…
        raise ImageRejected("corrupt") from None
