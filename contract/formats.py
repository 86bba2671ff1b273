"""The image formats the service accepts: one table, and everything else is built from it.

The intake decodes exactly these (``diagnosis.intake``: Pillow's decoders for all but DICOM, pydicom
for DICOM, chosen from the bytes); the bot lets through files whose MIME type or extension is one
of theirs (``bot.images``); every text that tells a user what to send names them through
``FORMAT_NAMES`` (the bot's conversation, the "unsupported" refusal, the web page and its file
picker, the API's documentation). No torch and no numpy here: the bot and the API read it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    name: str  # what a user is told
    pil: str | None  # Pillow's format name; None: DICOM, which pydicom reads
    mime_types: tuple[str, ...]
    extensions: tuple[str, ...]


FORMATS = (
    ImageFormat("JPEG", "JPEG", ("image/jpeg", "image/jpg", "image/pjpeg"), (".jpg", ".jpeg", ".jpe", ".jfif")),
    ImageFormat("PNG", "PNG", ("image/png",), (".png",)),
    ImageFormat("WebP", "WEBP", ("image/webp",), (".webp",)),
    ImageFormat("TIFF", "TIFF", ("image/tiff", "image/tif"), (".tif", ".tiff")),
    ImageFormat("BMP", "BMP", ("image/bmp", "image/x-ms-bmp"), (".bmp",)),
    ImageFormat("DICOM", None, ("application/dicom",), (".dcm", ".dicom", ".dic")),
)
PIL_FORMATS = tuple(f.pil for f in FORMATS if f.pil)  # what the intake lets Pillow open
MIME_TYPES = frozenset(mime for f in FORMATS for mime in f.mime_types)
EXTENSIONS = frozenset(suffix for f in FORMATS for suffix in f.extensions)
FORMAT_NAMES = ", ".join(f.name for f in FORMATS)  # "JPEG, PNG, …": the list every text names
ACCEPT = ",".join([*sorted(MIME_TYPES), *sorted(EXTENSIONS)])  # an HTML file input's ``accept``

