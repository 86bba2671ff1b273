import io
import struct
import zlib

import numpy as np
import pytest
from conftest import encode, gradient
from dicom_factory import make_dicom
from PIL import Image

from diagnosis.intake import MAX_INPUT_BYTES, ImageRejected, decode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_common_formats_decode_to_uint8_gray(fmt):
    source = gradient()
    data = encode(Image.fromarray(source).convert("RGB"), fmt)
    decoded = decode(data)
    assert decoded.format == fmt
    assert decoded.gray.dtype == np.uint8 and decoded.gray.shape == source.shape
    # lossy formats differ a little; the ramp must survive
    assert np.abs(decoded.gray.astype(int) - source.astype(int)).mean() < 4


def test_colour_becomes_luma_grayscale():
    rgb = np.zeros((100, 100, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green → ITU-R 601 luma 0.587·200
    decoded = decode(encode(Image.fromarray(rgb), "PNG"))
    assert abs(int(decoded.gray[50, 50]) - round(0.587 * 200)) <= 1


def test_exif_orientation_is_applied():
    source = gradient(200, 100)  # landscape, bright square top-left
    image = Image.fromarray(source)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    decoded = decode(encode(image, "JPEG", exif=exif))
    assert decoded.gray.shape == (200, 100)  # displayed as portrait
    assert decoded.gray[12:38, -38:-12].mean() > 200  # the square moved to the top-right corner
    assert decoded.gray[12:38, 12:38].mean() < 100


def test_16_bit_png_is_scaled_to_8_bit():
    values = (np.tile(np.linspace(0, 4095, 128), (128, 1))).astype(np.uint16)
    decoded = decode(encode(Image.fromarray(values), "PNG"))
    assert decoded.gray.min() == 0 and decoded.gray.max() == 255


def test_format_is_detected_from_content_not_name():
    data = encode(Image.fromarray(gradient()), "PNG")
    assert decode(data).format == "PNG"  # bytes only: no name is ever consulted


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_16_bit_both_photometrics(photometric):
    pixels = (np.tile(np.linspace(0, 4095, 128), (128, 1))).astype(np.uint16)
    decoded = decode(make_dicom(pixels, photometric=photometric, bits=12))
    assert decoded.format == "DICOM"
    left, right = decoded.gray[:, :5].mean(), decoded.gray[:, -5:].mean()
    if photometric == "MONOCHROME2":
        assert left < 10 and right > 245
    else:  # MONOCHROME1: low values are white
        assert left > 245 and right < 10


def test_dicom_window_is_applied():
    pixels = (np.tile(np.linspace(0, 4000, 128), (128, 1))).astype(np.uint16)
    decoded = decode(make_dicom(pixels, window=(1000, 500)))
    # everything above 1250 is white after windowing: most of the ramp saturates
    assert (decoded.gray == 255).mean() > 0.6


def test_dicom_multiframe_takes_first_frame():
    pixels = (np.tile(np.linspace(0, 255, 96), (96, 1))).astype(np.uint16)
    decoded = decode(make_dicom(pixels, frames=3))
    assert decoded.gray.shape == (96, 96)


def test_dicom_without_pixels_is_rejected_without_patient_data():
    with pytest.raises(ImageRejected) as caught:
        decode(make_dicom(None))
    assert caught.value.code == "no_pixels"
    assert "DOE" not in str(caught.value) and "PID" not in str(caught.value)


def test_truncated_dicom_is_rejected():
    pixels = np.zeros((128, 128), dtype=np.uint16)
    with pytest.raises(ImageRejected) as caught:
        decode(make_dicom(pixels)[:-5000])
    assert caught.value.code == "corrupt"


@pytest.mark.parametrize(("data", "code"), [
    (b"", "empty"),
    (b"hello, this is not an image at all" * 10, "unsupported"),
    (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "unsupported"),
])
def test_garbage_is_rejected(data, code):
    with pytest.raises(ImageRejected) as caught:
        decode(data)
    assert caught.value.code == code


def test_truncated_jpeg_is_rejected():
    data = encode(Image.fromarray(gradient(400, 400)), "JPEG")
    with pytest.raises(ImageRejected) as caught:
        decode(data[: len(data) // 3])
    assert caught.value.code == "corrupt"


def test_oversized_input_is_rejected_before_decoding():
    with pytest.raises(ImageRejected) as caught:
        decode(b"\xff" * (MAX_INPUT_BYTES + 1))
    assert caught.value.code == "too_large"


def test_tiny_image_is_rejected():
    with pytest.raises(ImageRejected) as caught:
        decode(encode(Image.new("L", (20, 20)), "PNG"))
    assert caught.value.code == "too_small"


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))


def test_decompression_bomb_header_is_rejected_without_decoding():
    with pytest.raises(ImageRejected) as caught:
        decode(_png_header_claiming(100_000, 100_000))
    assert caught.value.code == "too_many_pixels"


def test_real_bomb_compressed_small_is_rejected():
    image = Image.new("L", (8000, 8000))  # 64 Mpx of zeros compress to ~60 kB
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(ImageRejected) as caught:
        decode(buffer.getvalue())
    assert caught.value.code == "too_many_pixels"


def test_rejection_message_is_a_code_not_a_trace():
    with pytest.raises(ImageRejected) as caught:
        decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    assert str(caught.value) in ImageRejected.CODES
