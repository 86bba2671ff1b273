"""Fuzz ``diagnosis.intake.decode``: only ``ImageRejected`` may come out, never another exception, a crash or a hang.

    python -m tests.fuzz_intake --cases 10000            # mutation fuzzing, prints the outcome histogram
    python -m tests.fuzz_intake --cases 10000 --json /tmp/fuzz.json --save-dir /tmp/fuzz-findings
    python -m tests.fuzz_intake --atheris -- -runs=100000 # coverage-guided, with atheris (libFuzzer)

Cases are built from a seed corpus of small valid files (JPEG, PNG, WebP, TIFF, BMP and DICOM in
several flavours: 8/12/16 bit, MONOCHROME1/2, multi-frame, RGB, RLE- and JPEG-compressed, without
pixel data) by byte-level mutations (bit flips, "interesting" integers, inserted, deleted, repeated
or spliced blocks, truncation) and, for DICOM, by semantic mutations of the header (Rows, Columns,
BitsAllocated, NumberOfFrames, transfer syntax … set to odd values) that random bytes seldom hit.

Each case is decoded in a child process (``DecodeSandbox``) with a wall-clock bound and an
address-space limit: a hang is killed and reported as ``hang``, a crash (signal) as ``crash``,
any exception other than ``ImageRejected`` as ``error:<type>``. Findings are saved with
``--save-dir`` to be replayed with ``--replay FILE``. The exit status is 1 when anything but
``ok:*`` and ``rejected:*`` outcomes occurred. ``tests/test_fuzz_intake.py`` runs a small sample
of the same machinery (and a hypothesis-driven variant) in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dicom_factory, also under `python -m`

INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 100_000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF)
MAX_CASE_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------- seed corpus
def _pil_bytes(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def seed_corpus() -> dict[str, bytes]:
    """Small valid files of every accepted format (the fuzzing starts from these)."""
    import numpy as np
    from dicom_factory import make_dicom
    from PIL import Image
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(1)
    height, width = 72, 80  # above intake's 64 px minimum side, small enough to be fast
    ramp = np.tile(np.linspace(0, 255, width), (height, 1))
    gray = np.clip(ramp + rng.normal(0, 12, ramp.shape), 0, 255).astype(np.uint8)
    rgb = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], axis=-1)
    L, RGB = Image.fromarray(gray, "L"), Image.fromarray(rgb, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = (ramp * 16).astype(np.uint16)
    corpus = {
        "jpeg-gray": _pil_bytes(L, "JPEG", quality=85),
        "jpeg-rgb": _pil_bytes(RGB, "JPEG", quality=85),
        "jpeg-progressive": _pil_bytes(RGB, "JPEG", progressive=True, quality=80),
        "jpeg-exif": _pil_bytes(L, "JPEG", exif=exif),
        "jpeg-cmyk": _pil_bytes(RGB.convert("CMYK"), "JPEG"),
        "png-gray": _pil_bytes(L, "PNG"),
        "png-rgba": _pil_bytes(RGB.convert("RGBA"), "PNG"),
        "png-palette": _pil_bytes(RGB.convert("P"), "PNG", transparency=0),
        "png-16bit": _pil_bytes(Image.fromarray(wide), "PNG"),
        "png-1bit": _pil_bytes(L.convert("1"), "PNG"),
        "webp-lossy": _pil_bytes(RGB, "WEBP", quality=70),
        "webp-lossless": _pil_bytes(L, "WEBP", lossless=True),
        "webp-animated": _pil_bytes(RGB, "WEBP", save_all=True, append_images=[L.convert("RGB")], duration=50),
        "tiff-raw": _pil_bytes(L, "TIFF"),
        "tiff-lzw": _pil_bytes(RGB, "TIFF", compression="tiff_lzw"),
        "tiff-deflate": _pil_bytes(L, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-packbits": _pil_bytes(L, "TIFF", compression="packbits"),
        "tiff-jpeg": _pil_bytes(RGB, "TIFF", compression="jpeg"),
        "tiff-multipage": _pil_bytes(L, "TIFF", save_all=True, append_images=[L.rotate(90, expand=True)]),
        "tiff-16bit": _pil_bytes(Image.fromarray(wide), "TIFF"),
        "tiff-float": _pil_bytes(Image.fromarray(ramp.astype(np.float32), "F"), "TIFF"),
        "bmp-gray": _pil_bytes(L, "BMP"),
        "bmp-rgb": _pil_bytes(RGB, "BMP"),
        "dicom-16bit": make_dicom((ramp * 16).astype(np.uint16), bits=12),
        "dicom-mono1-window": make_dicom((ramp * 16).astype(np.uint16), photometric="MONOCHROME1", bits=12,
                                         window=(2000, 1500)),
        "dicom-8bit": make_dicom(gray, bits=8),
        "dicom-multiframe": make_dicom(gray.astype(np.uint16), frames=3),
        "dicom-no-pixels": make_dicom(None),
        "dicom-rgb": _dicom_rgb(rgb),
        "dicom-rle": _dicom_compressed(make_dicom(gray.astype(np.uint16)), RLELossless),
        "dicom-jpeg": _dicom_jpeg(gray),
    }
    return corpus


def _dicom_rgb(rgb) -> bytes:
    import pydicom
    from dicom_factory import make_dicom

    dataset = pydicom.dcmread(io.BytesIO(make_dicom(rgb[..., 0], bits=8)))
    dataset.SamplesPerPixel = 3
    dataset.PhotometricInterpretation = "RGB"
    dataset.PlanarConfiguration = 0
    dataset.PixelData = rgb.astype("uint8").tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _dicom_compressed(data: bytes, syntax) -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.compress(syntax)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _dicom_jpeg(gray) -> bytes:
    """An encapsulated JPEG baseline DICOM (what many X-ray modalities send)."""
    import pydicom
    from dicom_factory import make_dicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    dataset = pydicom.dcmread(io.BytesIO(make_dicom(gray, bits=8)))
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([_pil_bytes(Image.fromarray(gray), "JPEG", quality=90)])
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- mutations
def _pos(rng: random.Random, data: bytes | bytearray) -> int:
    """A position, biased towards headers (the first 512 bytes) half of the time."""
    if not data:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(min(len(data), 512))
    return rng.randrange(len(data))


def _bitflip(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        if data:
            data[_pos(rng, data)] ^= 1 << rng.randrange(8)


def _bytes(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 16)):
        if data:
            data[_pos(rng, data)] = rng.randrange(256)


def _interesting(data: bytearray, rng: random.Random) -> None:
    value = rng.choice(INTERESTING)
    size = rng.choice((1, 2, 4))
    raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, rng.choice(("big", "little")))
    at = _pos(rng, data)
    data[at:at + size] = raw


def _insert(data: bytearray, rng: random.Random) -> None:
    at = _pos(rng, data)
    data[at:at] = rng.randbytes(rng.choice((1, 4, 16, 256, 4096)))


def _delete(data: bytearray, rng: random.Random) -> None:
    at = _pos(rng, data)
    del data[at:at + rng.choice((1, 4, 16, 256, 4096))]


def _repeat(data: bytearray, rng: random.Random) -> None:
    at = _pos(rng, data)
    block = bytes(data[at:at + rng.choice((4, 16, 64, 512))])
    data[at:at] = block * rng.choice((2, 16, 256, 2048))


def _duplicate(data: bytearray, rng: random.Random) -> None:
    start = _pos(rng, data)
    block = bytes(data[start:start + rng.randint(1, 256)])
    at = _pos(rng, data)
    data[at:at] = block


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data) + 1):]


MUTATIONS: dict[str, Callable[[bytearray, random.Random], None]] = {
    "bitflip": _bitflip, "bytes": _bytes, "interesting": _interesting, "insert": _insert, "delete": _delete,
    "repeat": _repeat, "duplicate": _duplicate, "truncate": _truncate,
}


def mutate(data: bytes, rng: random.Random, corpus: dict[str, bytes] | None = None) -> tuple[bytes, list[str]]:
    """1–5 random byte-level mutations (and sometimes a splice with another seed)."""
    buffer = bytearray(data)
    applied = []
    for _ in range(rng.randint(1, 5)):
        if corpus and rng.random() < 0.05:
            other = corpus[rng.choice(sorted(corpus))]
            cut = rng.randrange(len(buffer) + 1)
            buffer = buffer[:cut] + bytearray(other[rng.randrange(len(other) + 1):])
            applied.append("splice")
            continue
        name = rng.choice(sorted(MUTATIONS))
        MUTATIONS[name](buffer, rng)
        applied.append(name)
    return bytes(buffer[:MAX_CASE_BYTES]), applied


DICOM_FIELDS = {
    "Rows": lambda rng: rng.choice((0, 1, 63, 65535, rng.randrange(1, 70000))),
    "Columns": lambda rng: rng.choice((0, 1, 63, 65535, rng.randrange(1, 70000))),
    "BitsAllocated": lambda rng: rng.choice((0, 1, 7, 8, 12, 16, 24, 32, 64, 255)),
    "BitsStored": lambda rng: rng.choice((0, 1, 8, 12, 16, 17, 33, 64)),
    "HighBit": lambda rng: rng.choice((0, 7, 11, 15, 31, 63, 255)),
    "SamplesPerPixel": lambda rng: rng.choice((0, 1, 2, 3, 4, 255)),
    "PixelRepresentation": lambda rng: rng.choice((0, 1, 2)),
    "NumberOfFrames": lambda rng: str(rng.choice((0, 1, 2, 1000, 10**9, -1))),
    "PhotometricInterpretation": lambda rng: rng.choice(("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL",
                                                         "PALETTE COLOR", "", "BOGUS")),
    "PlanarConfiguration": lambda rng: rng.choice((0, 1, 2)),
    "RescaleSlope": lambda rng: rng.choice(("0", "1e308", "-1", "nan", "inf", "abc")),
    "RescaleIntercept": lambda rng: rng.choice(("0", "-1e308", "nan", "1024")),
    "WindowCenter": lambda rng: rng.choice(("0", "1e30", "-5", "nan")),
    "WindowWidth": lambda rng: rng.choice(("0", "1", "-1", "1e-30", "nan")),
    "PatientName": lambda rng: "DOE^JANE" * rng.choice((1, 1000)),
}
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.3.4")


def mutate_dicom(data: bytes, rng: random.Random) -> tuple[bytes, list[str]] | None:
    """Set 1–3 header fields (or the transfer syntax) of a DICOM seed to odd values; None if unsavable."""
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        applied = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.15:
                dataset.file_meta.TransferSyntaxUID = rng.choice(TRANSFER_SYNTAXES)
                applied.append("dicom:TransferSyntaxUID")
                continue
            name = rng.choice(sorted(DICOM_FIELDS))
            setattr(dataset, name, DICOM_FIELDS[name](rng))
            applied.append(f"dicom:{name}")
        if rng.random() < 0.2 and "PixelData" in dataset:
            pixels = dataset.PixelData
            dataset.PixelData = pixels[: rng.randrange(len(pixels) + 1)] if rng.random() < 0.5 else pixels * 2
            applied.append("dicom:PixelDataLength")
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=False)
        return buffer.getvalue(), applied
    except Exception:
        return None


def generate(count: int, seed: int = 0) -> Iterator[tuple[int, str, list[str], bytes]]:
    """``count`` cases: (index, seed name, mutations applied, bytes); deterministic for a ``seed``."""
    import logging
    import warnings

    corpus = seed_corpus()
    names = sorted(corpus)
    rng = random.Random(seed)
    warnings.filterwarnings("ignore", module="pydicom")  # odd header values are the point here
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for index in range(count):
        name = rng.choice(names)
        data = corpus[name]
        if index < len(names):  # the seeds themselves first
            name = names[index]
            yield index, name, [], corpus[name]
            continue
        if name.startswith("dicom") and rng.random() < 0.4:
            mutated = mutate_dicom(data, rng)
            if mutated is not None:
                data, applied = mutated
                if rng.random() < 0.3:
                    data, more = mutate(data, rng)
                    applied += more
                yield index, name, applied, data
                continue
        data, applied = mutate(data, rng, corpus)
        yield index, name, applied, data


# --------------------------------------------------------------------------- running a case
def classify(data: bytes) -> tuple[str, str]:
    """Decode in this process: ("ok", format) / ("rejected", code) / ("error", traceback)."""
    from diagnosis.intake import DecodedImage, ImageRejected, decode

    try:
        decoded = decode(data)
    except ImageRejected as rejected:
        return "rejected", rejected.code
    except BaseException as error:  # the finding: anything else escaping
        return f"error:{type(error).__name__}", traceback.format_exc(limit=8)
    if not isinstance(decoded, DecodedImage) or decoded.gray.dtype.name != "uint8" or decoded.gray.ndim != 2:
        return "error:BadResult", repr(type(decoded))
    return "ok", decoded.format


def _serve(conn, memory_mb: int | None) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # libtiff and libjpeg complain on stderr about every broken file
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)  # pydicom warns about every broken header
    classify(b"")  # import everything before the first timed case
    conn.send(("ready", ""))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        conn.send(classify(data))


@dataclass
class Outcome:
    kind: str  # ok | rejected | error:<Type> | hang | crash
    detail: str
    seconds: float

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.detail}" if self.kind in ("ok", "rejected") else self.kind

    @property
    def acceptable(self) -> bool:
        return self.kind in ("ok", "rejected")


class DecodeSandbox:
    """A child process that decodes one case at a time, killed and replaced on a hang or a crash."""

    def __init__(self, timeout_s: float = 10.0, memory_mb: int | None = 3072):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None

    def __enter__(self) -> DecodeSandbox:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child, self.memory_mb), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(120) or parent.recv()[0] != "ready":
            raise RuntimeError("the decode sandbox did not start")

    def close(self) -> None:
        if self._process is not None:
            if self._conn is not None:
                self._conn.close()
            self._process.join(2)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._process = self._conn = None

    def run(self, data: bytes) -> Outcome:
        if self._process is None or not self._process.is_alive():
            self._start()
        started = time.monotonic()
        try:
            self._conn.send_bytes(data)
            if self._conn.poll(self.timeout_s):
                kind, detail = self._conn.recv()
                return Outcome(kind, detail, time.monotonic() - started)
        except (EOFError, OSError, BrokenPipeError):
            pass
        elapsed = time.monotonic() - started
        if self._process.is_alive():  # no answer within the bound: a hang
            self._process.kill()
            self._process.join(5)
            self._process = None
            return Outcome("hang", f"> {self.timeout_s:.0f}s", elapsed)
        self._process.join(5)
        code = self._process.exitcode
        self._process = None
        return Outcome("crash", f"exit code {code}", elapsed)


# --------------------------------------------------------------------------- the command line
def run(cases: int, seed: int = 0, timeout_s: float = 10.0, save_dir: Path | None = None,
        progress: bool = False) -> dict:
    histogram: collections.Counter[str] = collections.Counter()
    findings: list[dict] = []
    slowest = (0.0, "")
    started = time.monotonic()
    with DecodeSandbox(timeout_s) as sandbox:
        for index, name, applied, data in generate(cases, seed):
            outcome = sandbox.run(data)
            histogram[outcome.label] += 1
            if outcome.seconds > slowest[0]:
                slowest = (outcome.seconds, f"case {index} ({name}, {'+'.join(applied) or 'seed'})")
            if not outcome.acceptable:
                digest = hashlib.sha256(data).hexdigest()[:16]
                finding = {"case": index, "seed": name, "mutations": applied, "outcome": outcome.kind,
                           "detail": outcome.detail[-2000:], "sha256": digest}
                findings.append(finding)
                if save_dir is not None:
                    save_dir.mkdir(parents=True, exist_ok=True)
                    (save_dir / f"{outcome.kind.replace(':', '-')}-{digest}.bin").write_bytes(data)
            if progress and (index + 1) % 1000 == 0:
                print(f"  {index + 1} cases, {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return {
        "cases": sum(histogram.values()),
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
        "timeout_s": timeout_s,
        "bad": len(findings),
        "slowest_s": round(slowest[0], 3),
        "slowest_case": slowest[1],
        "histogram": dict(histogram.most_common()),
        "findings": findings[:50],
    }


def print_report(report: dict) -> None:
    print(f"fuzzed diagnosis.intake.decode: {report['cases']} cases in {report['seconds']}s "
          f"(seed {report['seed']}, bound {report['timeout_s']}s/case, slowest {report['slowest_s']}s)")
    width = max(len(label) for label in report["histogram"])
    for label, count in report["histogram"].items():
        print(f"  {label:<{width}}  {count:>7}")
    print(f"unexpected outcomes (exceptions other than ImageRejected, crashes, hangs): {report['bad']}")
    for finding in report["findings"][:10]:
        print(f"  case {finding['case']} from {finding['seed']} ({'+'.join(finding['mutations'])}): "
              f"{finding['outcome']}\n    {finding['detail'].strip().splitlines()[-1] if finding['detail'] else ''}")


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing with atheris; pass libFuzzer options after ``--``."""
    import atheris

    with atheris.instrument_imports():
        import pydicom  # noqa: F401  (instrumented: the DICOM parser is pure Python)
        from PIL import Image  # noqa: F401

        from diagnosis.intake import ImageRejected, decode

    def test_one_input(data: bytes) -> None:
        with contextlib.suppress(ImageRejected):
            decode(data)

    corpus_dir = Path(os.environ.get("XSO_FUZZ_CORPUS", Path(tempfile.gettempdir()) / "xso-fuzz-corpus"))
    if not corpus_dir.exists():
        corpus_dir.mkdir(parents=True)
        for name, data in seed_corpus().items():
            (corpus_dir / name).write_bytes(data)
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    atheris.Setup([sys.argv[0], *argv, str(corpus_dir)], test_one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="wall-clock bound per case (seconds)")
    parser.add_argument("--save-dir", type=Path, help="write the inputs of unexpected outcomes here")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--replay", type=Path, nargs="*", help="decode these files and print their outcomes")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing (libFuzzer options after --)")
    args, rest = parser.parse_known_args(argv)
    if args.atheris:
        atheris_main([a for a in rest if a != "--"])
        return 0
    if args.replay:
        with DecodeSandbox(args.timeout) as sandbox:
            for path in args.replay:
                outcome = sandbox.run(path.read_bytes())
                print(f"{path}: {outcome.label} ({outcome.seconds:.2f}s)")
                if not outcome.acceptable:
                    print(outcome.detail)
        return 0
    report = run(args.cases, args.seed, args.timeout, args.save_dir, progress=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
