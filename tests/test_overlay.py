"""The overlay a user receives: one finding per image, ≤ 1280 px, red = raised, blue = lowered, never blank."""

import cv2
import numpy as np
import pytest

from diagnosis.overlay import (
    MAX_SIDE,
    MIN_SIDE,
    display_size,
    encode_jpeg,
    fit_film,
    legend_height,
    render_overlay,
    render_overlays,
)


def film(width: int, height: int) -> np.ndarray:
    """A grey radiograph-like ramp with texture (uint8, 2-D)."""
    ramp = np.linspace(60, 200, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    texture = np.random.default_rng(0).normal(0, 8, (height, width))
    return np.clip(ramp + texture, 0, 255).astype(np.uint8)


def decode(jpeg: bytes) -> np.ndarray:
    assert jpeg[:3] == b"\xff\xd8\xff"
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


@pytest.mark.parametrize(("size", "expected"), [((3200, 2400), (1280, 960)), ((128, 128), (768, 768)),
                                                 ((1000, 900), (1000, 900)), ((200, 600), (256, 768)),
                                                 ((2000, 2000), (1191, 1191)), ((1000, 3000), (415, 1244))])
def test_longest_side_is_clamped_for_a_phone_legend_included(size, expected):
    width, height = display_size(*size)
    assert (width, height) == expected
    assert max(width, height) >= MIN_SIDE and height + legend_height(width) <= MAX_SIDE


@pytest.mark.parametrize("shape", [(2400, 3200), (128, 128), (900, 300), (1280, 1280), (4000, 1000)])
def test_one_jpeg_per_finding_each_at_most_1280_px_with_the_legend_below(shape):
    heat = np.array([[1.0, 0.2], [-0.5, -1.0]], np.float32)
    jpegs = render_overlays(film(shape[1], shape[0]), [heat, -heat, heat * 0.5])
    assert len(jpegs) == 3  # one image per finding, never panels side by side
    for jpeg in jpegs:
        image = decode(jpeg)
        width, height = display_size(shape[1], shape[0])
        assert image.shape[:2] == (height + legend_height(width), width)  # the film, the legend strip below
        assert max(image.shape[:2]) <= MAX_SIDE


def test_red_where_the_estimate_was_raised_blue_where_lowered_plain_film_where_zero():
    gray = np.full((400, 400), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:, :2] = 1.0  # left: raised
    heat[:, -2:] = -1.0  # right: lowered
    image = render_overlay(fit_film(gray), heat)
    blue, green, red = (image[384, 40 * 768 // 400].astype(int))  # left, film row (film is 768 px)
    assert red > blue + 60 and red > green + 60
    blue, green, red = (image[384, 760].astype(int))
    assert blue > red + 60
    assert np.abs(image[384, 384].astype(int) - 128).max() <= 8  # zero evidence: the plain film


def coloured_share(plain: np.ndarray, shown: np.ndarray) -> float:
    return float((cv2.absdiff(plain, shown).max(axis=2) > 8).mean())


@pytest.mark.parametrize("heat", [
    -np.abs(np.random.default_rng(2).normal(size=(4, 4))),  # every region lowered the estimate
    np.abs(np.random.default_rng(3).normal(size=(4, 4))),
    np.random.default_rng(4).normal(size=(4, 4)),
], ids=["all-negative", "all-positive", "mixed"])
def test_a_panel_is_never_blank(heat):
    from diagnosis.heatmap import symmetric_scale

    gray = film(512, 512)
    plain = fit_film(gray)
    shown = render_overlay(plain, symmetric_scale(heat.astype(np.float32)))[: plain.shape[0]]
    assert coloured_share(plain, shown) > 0.05


def test_jpeg_round_trip():
    image = render_overlay(fit_film(film(200, 200)), np.ones((2, 2), np.float32))
    assert decode(encode_jpeg(image)).shape == image.shape
