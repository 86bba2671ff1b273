"""Fuzzing the intake in CI: only ``ImageRejected`` may leave ``decode``; no other exception, crash or hang.

A small sample of what ``python -m tests.fuzz_intake --cases 10000`` does (see that module), plus
hypothesis-driven cases that shrink to a minimal failing input. Every case runs in a child process
with a wall-clock bound (``XSO_FUZZ_CASE_TIMEOUT_S``, default 10 s), so a hang or a crash of a
decoder fails the test instead of the test run. ``XSO_FUZZ_CASES`` sets the number of hypothesis
examples per test (default 300).
"""

from __future__ import annotations

import os
import random

import pytest
from fuzz_intake import MUTATIONS, DecodeSandbox, mutate_dicom, run, seed_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES = int(os.environ.get("XSO_FUZZ_CASES", "300"))
CASE_TIMEOUT_S = float(os.environ.get("XSO_FUZZ_CASE_TIMEOUT_S", "10"))
CORPUS = seed_corpus()
MAGIC = {
    "jpeg": b"\xff\xd8\xff\xe0", "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    "tiff-le": b"II*\x00", "tiff-be": b"MM\x00*", "bmp": b"BM", "dicom": b"\x00" * 128 + b"DICM",
}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the odd values on purpose
FUZZ = settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def sandbox():
    with DecodeSandbox(timeout_s=CASE_TIMEOUT_S) as box:
        yield box


def check(sandbox: DecodeSandbox, data: bytes, what: str) -> None:
    outcome = sandbox.run(data)
    assert outcome.acceptable, f"{what}: {outcome.kind}\n{outcome.detail}"
    assert outcome.seconds < CASE_TIMEOUT_S


def test_every_seed_decodes(sandbox):
    for name, data in CORPUS.items():
        outcome = sandbox.run(data)
        expected = ("rejected", "no_pixels") if name == "dicom-no-pixels" else ("ok",)
        assert (outcome.kind, outcome.detail)[: len(expected)] == expected, (name, outcome)


@FUZZ
@given(name=st.sampled_from(sorted(CORPUS)),
       ops=st.lists(st.tuples(st.sampled_from(sorted(MUTATIONS)), st.integers(0, 2**32 - 1)), min_size=1, max_size=5))
def test_mutated_files_are_decoded_or_rejected(sandbox, name, ops):
    data = bytearray(CORPUS[name])
    for op, seed in ops:
        MUTATIONS[op](data, random.Random(seed))
    check(sandbox, bytes(data), f"{name} + {ops}")


@FUZZ
@given(name=st.sampled_from(sorted(n for n in CORPUS if n.startswith("dicom"))), seed=st.integers(0, 2**32 - 1))
def test_dicom_with_odd_header_values_is_decoded_or_rejected(sandbox, name, seed):
    mutated = mutate_dicom(CORPUS[name], random.Random(seed))
    if mutated is not None:
        check(sandbox, mutated[0], f"{name} + {mutated[1]}")


@FUZZ
@given(magic=st.sampled_from(sorted(MAGIC)), tail=st.binary(max_size=4096))
def test_arbitrary_bytes_behind_a_magic_number_are_rejected_cleanly(sandbox, magic, tail):
    check(sandbox, MAGIC[magic] + tail, magic)


def test_the_fuzz_script_reports_a_histogram():
    report = run(cases=max(CASES, len(CORPUS) + 50), seed=7, timeout_s=CASE_TIMEOUT_S)
    assert report["cases"] == max(CASES, len(CORPUS) + 50)
    assert report["bad"] == 0, report["findings"]
    kinds = {label.split(":")[0] for label in report["histogram"]}
    assert kinds == {"ok", "rejected"}


@pytest.mark.parametrize("seed", ["dicom-rgb", "dicom-8bit"])
def test_dicom_with_more_pixel_data_than_declared_takes_the_first_frame(seed):
    """Found by the fuzzer: pydicom infers extra frames from the data length; decode raised ValueError."""
    import io

    import pydicom

    from diagnosis.intake import decode

    dataset = pydicom.dcmread(io.BytesIO(CORPUS[seed]))
    dataset.PixelData = dataset.PixelData * 2  # two frames' worth, NumberOfFrames absent
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    decoded = decode(buffer.getvalue())
    assert decoded.gray.shape == (dataset.Rows, dataset.Columns)
