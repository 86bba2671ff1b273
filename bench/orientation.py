"""`python -m bench.orientation [--runs 40]`: what the orientation head costs the whole pipeline.

The same images run through two pipelines loaded side by side in one process: the shipped models,
and the same models with the gate card's ``orientation`` section left out (a copy of the folder in a
temporary directory). Images: the example film as sent, a phone-style 1280×960 JPEG of it, and the
film turned by 90° and 180° (the head turns those back, at the cost of a second gate pass) and
tilted by 15° on black (the photo step straightens it). ``--against DIR`` compares with another
models folder instead (an older gate card: the cost of a change to the head). Rounds
alternate between the two pipelines, so a busy machine slows both alike; the table gives p50/p95 of
the whole pipeline (``timings_ms["total"]``, overlays included) and the difference of the p50s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

from bench.__main__ import ROOT, machine, phone_style_jpeg
from diagnosis.config import PipelineConfig, models_dir_from_environment


def turned_jpeg(source: Path, quarter_turns: int) -> bytes:
    gray = np.rot90(np.asarray(Image.open(source).convert("L")), quarter_turns)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def without_orientation(models: Path, into: Path) -> Path:
    shutil.copytree(models, into, dirs_exist_ok=True)
    card_path = into / "gate" / "card.json"
    card = json.loads(card_path.read_text())
    card.pop("orientation", None)
    card_path.write_text(json.dumps(card, indent=1))
    return into


def tilted_jpeg(source: Path, degrees: float) -> bytes:
    from training.measure.routing import as_jpeg, turn

    return as_jpeg(turn(np.asarray(Image.open(source).convert("L")), degrees))


def main(argv: list[str] | None = None) -> int:
    from diagnosis.pipeline import Pipeline

    parser = argparse.ArgumentParser(prog="python -m bench.orientation", description=__doc__)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", type=Path,
                        help="compare with this models folder (e.g. an older gate card) instead of the same "
                             "models without the orientation section")
    args = parser.parse_args(argv)
    models = models_dir_from_environment()
    example = ROOT / "examples" / "chest_xray.jpg"
    images = {"film as sent": example.read_bytes(), "phone JPEG 1280×960": phone_style_jpeg(example),
              "film turned 90°": turned_jpeg(example, 1), "film turned 180°": turned_jpeg(example, 2),
              "film tilted 15°": tilted_jpeg(example, 15)}
    with tempfile.TemporaryDirectory() as scratch:
        pipelines = {
            "with head": Pipeline.load(PipelineConfig(models_dir=models, backend=args.backend, threads=args.threads)),
            "without head": Pipeline.load(PipelineConfig(
                models_dir=args.against or without_orientation(models, Path(scratch)), backend=args.backend,
                threads=args.threads)),
        }
        if pipelines["with head"].gate.orientation is None:
            raise SystemExit(f"the gate card in {models} has no orientation section: nothing to compare")
        times = {(name, image): [] for name in pipelines for image in images}
        turned = {}
        for run in range(args.runs + 2):  # two warm-up rounds
            for image, data in images.items():
                for name, pipeline in pipelines.items():
                    result = pipeline.run(data).result
                    if run >= 2:
                        times[name, image].append(result.timings_ms["total"])
                    turned[name, image] = result.turned
    print(f"{machine()}; {args.runs} runs per cell, backend {args.backend}, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f}"
          + (f"; 'without head' = the models in {args.against}" if args.against else ""))
    print("| image | without head p50 / p95 (ms) | with head p50 / p95 (ms) | p50 difference (ms) | turned |")
    print("|---|---|---|---|---|")
    for image in images:
        a, b = np.asarray(times["without head", image]), np.asarray(times["with head", image])
        print(f"| {image} | {np.median(a):.1f} / {np.percentile(a, 95):.1f} | {np.median(b):.1f} / "
              f"{np.percentile(b, 95):.1f} | {np.median(b) - np.median(a):+.1f} | {turned['with head', image]}° |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
