from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # model_factory, dicom helpers
PACK = Path(os.environ.get("XRAY_PACK", ROOT.parent / "shared" / "data" / "xray-pack"))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 200, height: int = 160, texture: bool = False) -> np.ndarray:
    """A left-to-right ramp with a bright square: orientation and content are checkable.

    ``texture`` adds fine detail so the image passes the quality check (a bare ramp is "blurred")."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))
    if texture:
        ramp = 30 + 0.75 * ramp + np.random.default_rng(0).normal(0, 18, ramp.shape)
    ramp[10:40, 10:40] = 235 if texture else 255  # textured: bright, not blown out ("glare")
    return ramp.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def pack() -> Path:
    if not (PACK / "manifest.csv").is_file():
        pytest.fail(f"xray-pack not found at {PACK}; set XRAY_PACK")
    return PACK


@pytest.fixture(scope="session")
def fake_models(tmp_path_factory) -> Path:
    from model_factory import make_models_dir

    return make_models_dir(tmp_path_factory.mktemp("models"))
