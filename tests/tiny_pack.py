"""Tiny packs for tests: a manifest in the data pack's format (its README) over a few small images the
caller draws, and ``python -m training`` run as a subprocess."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT

from training.data.datasets import CHEST_LABELS

COLUMNS = ["path", "source", "split", "is_xray", "body_part", "patient_id", "phone_photo", "kind", *CHEST_LABELS]


def write_tiny_pack(root: Path, counts: dict[str, int],
                    film: Callable[[str, int, Path], tuple[bool, str, list[int] | None]]) -> Path:
    """``root/manifest.csv`` over ``counts[split]`` images per split; ``film(split, index, path)`` writes
    one image at ``path`` and says whether it is a radiograph (else a natural photo), its body part and
    its 14 chest labels (None: all 0)."""
    rows = []
    for split, count in counts.items():
        for index in range(count):
            name = f"images/{split}_{index}.png"
            xray, part, labels = film(split, index, root / name)
            rows.append([name, "tiny", split, int(xray), part if xray else "", f"p{index}", 0,
                         "radiograph" if xray else "natural_photo", *(labels or [0] * len(CHEST_LABELS))])
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return root / "manifest.csv"


def run_training(*args: str) -> subprocess.CompletedProcess:
    """``python -m training *args`` from the repository root; fails the test with its stderr's end."""
    proc = subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
