"""The one preprocessing path shared by training and inference.

A model card's ``input`` block says the size and normalisation; ``to_tensor_input`` applies it.
Training augments a PIL image first and then calls exactly this function.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_gray(gray: np.ndarray | Image.Image, size: int) -> Image.Image:
    """Squash to size×size (the paper resizes whole images; radiographs have no canonical crop)."""
    image = gray if isinstance(gray, Image.Image) else Image.fromarray(gray, mode="L")
    if image.mode != "L":
        image = image.convert("L")
    if image.size == (size, size):
        return image
    # reducing_gap: fast box pre-reduction for large phone photos, then an antialiased bilinear.
    return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def normalise(image: Image.Image, mean: float, std: float) -> np.ndarray:
    """8-bit grayscale → float32 array of shape (1, H, W): (pixel/255 - mean) / std."""
    pixels = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
    return ((pixels - mean) / std)[None, :, :]


def to_model_input(gray: np.ndarray | Image.Image, size: int, mean: float, std: float) -> np.ndarray:
    return normalise(resize_gray(gray, size), mean, std)
