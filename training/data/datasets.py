"""Where training images come from: the xray-pack manifest and the native layouts of the big sets.

Every loader returns ``Record``s; a ``Task`` turns records into targets. Images are decoded through
``diagnosis.intake`` and preprocessed by ``diagnosis.preprocess`` — the same path as inference.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.formats import EXTENSIONS

CHEST_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]  # fmt: skip
BODY_PARTS = [
    "ankle", "spine", "chest", "elbow", "finger", "foot", "forearm", "hand", "hip", "humerus", "knee",
    "shoulder", "dental", "wrist",
]  # fmt: skip
GATE_LABELS = ["not_xray", "xray"]
# Chest films whose 14 labels and "normal" come from one hospital: models are chosen and judged on
# these, since other sources differ in hospital, device and population as well as in findings.
NIH_SOURCES = ("nih_cxr14", "nih_extra")
MURA_PARTS = {
    "XR_ELBOW": "elbow", "XR_FINGER": "finger", "XR_FOREARM": "forearm", "XR_HAND": "hand",
    "XR_HUMERUS": "humerus", "XR_SHOULDER": "shoulder", "XR_WRIST": "wrist",
}  # fmt: skip


SYNTHETIC_PREFIX = "synthetic_"  # source name of training.data.synthetic_photos output: synthetic_<original source>


@dataclass(frozen=True)
class Record:
    path: Path
    split: str  # train / val / test
    is_xray: bool
    body_part: str | None = None
    # 14 values in CHEST_LABELS order, chest rows only: 1 present, 0 absent, None unknown (a source
    # that read only some findings, e.g. COVID-19 films with no mapping to the 14)
    chest_labels: tuple[int | None, ...] | None = None
    abnormal: int | None = None  # chest: 1 any finding, 0 normal, None unknown
    population: str = ""  # adult / paediatric where the manifest says
    kind: str = "radiograph"
    source: str = "unknown"
    patient_id: str = ""
    phone_photo: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def synthetic(self) -> bool:
        return self.source.startswith(SYNTHETIC_PREFIX)

    @property
    def group(self) -> str:
        """Balancing group: body part for radiographs, kind for everything else."""
        return self.body_part or self.kind if self.is_xray else self.kind


def load_manifest(csv_path: Path | str) -> list[Record]:
    """An xray-pack manifest (manifest.csv, manifest-extra.csv, …): paths are relative to its folder.

    ``chest_labels`` = all14 or normal (or no such column): the 14 columns are known, empty = 0;
    partial: an empty cell is unknown. ``abnormal`` comes from its column, else from the 14 labels
    when they say something (any positive, or all known and negative).
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    records = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            body_part = row.get("body_part") or None
            labels, abnormal = None, None
            if body_part == "chest" and all(name in row for name in CHEST_LABELS):
                labels = _chest_labels(row)
                abnormal = _abnormal(row.get("abnormal", ""), labels)
            records.append(
                Record(
                    path=root / row["path"],
                    split=row["split"],
                    is_xray=row["is_xray"] == "1",
                    body_part=body_part,
                    chest_labels=labels,
                    abnormal=abnormal,
                    population=row.get("population") or "",
                    kind=row.get("kind") or ("radiograph" if row["is_xray"] == "1" else "other"),
                    source=row.get("source") or "unknown",
                    patient_id=row.get("patient_id") or "",
                    phone_photo=row.get("phone_photo") == "1",
                )
            )
    return records


def _chest_labels(row: dict) -> tuple[int | None, ...]:
    if row.get("chest_labels") == "partial":
        return tuple(int(row[name]) if row[name] != "" else None for name in CHEST_LABELS)
    return tuple(int(row[name] or 0) for name in CHEST_LABELS)


def _abnormal(cell: str, labels: tuple[int | None, ...]) -> int | None:
    if cell != "":
        return int(cell)
    if any(value == 1 for value in labels):
        return 1
    return 0 if all(value is not None for value in labels) else None


def load_chestxray14(root: Path | str, val_fraction: float = 0.1) -> list[Record]:
    """NIH ChestX-ray14 as published: Data_Entry_2017.csv, train_val_list.txt, test_list.txt, images/.

    The official lists are patient-wise; val is carved out of train_val by patient id (never by image).
    """
    root = Path(root)
    test_names = set((root / "test_list.txt").read_text().split())
    image_dirs = [root / "images", *sorted(root.glob("images_*/images"))]
    locations = {p.name: p for d in image_dirs if d.is_dir() for p in d.iterdir()}
    records = []
    with (root / "Data_Entry_2017.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            name = row["Image Index"]
            findings = set(row["Finding Labels"].split("|"))
            patient = row.get("Patient ID", name.split("_")[0])
            split = "val" if _stable_fraction(patient) < val_fraction else "train"
            if name in test_names:
                split = "test"
            records.append(
                Record(
                    path=locations.get(name, root / "images" / name),
                    split=split,
                    is_xray=True,
                    body_part="chest",
                    chest_labels=tuple(int(label in findings) for label in CHEST_LABELS),
                    abnormal=int("No Finding" not in findings),
                    source="nih_cxr14",
                    patient_id=str(patient),
                )
            )
    return records


def load_mura(root: Path | str, val_fraction: float = 0.1) -> list[Record]:
    """MURA v1.1: ``train_image_paths.csv`` / ``valid_image_paths.csv``; body part from the path.

    MURA's own "valid" set is used as our test split; val is carved out of train by patient.
    Paths in the CSVs start with ``MURA-v1.1/``; ``root`` is the folder holding that directory.
    """
    root = Path(root)
    records = []
    for csv_name, default_split in (("train_image_paths.csv", "train"), ("valid_image_paths.csv", "test")):
        csv_path = _find(root, csv_name)
        base = csv_path.parent.parent if csv_path.parent.name.startswith("MURA") else csv_path.parent
        for line in csv_path.read_text().split():
            match = re.search(r"(XR_[A-Z]+)/(patient\d+)/", line)
            if not match:
                continue
            part, patient = MURA_PARTS[match.group(1)], match.group(2)
            split = default_split
            if split == "train" and _stable_fraction(patient) < val_fraction:
                split = "val"
            records.append(
                Record(
                    path=base / line,
                    split=split,
                    is_xray=True,
                    body_part=part,
                    source="mura",
                    patient_id=patient,
                    extra={"abnormal": "positive" in line},
                )
            )
    return records


def load_folder_tree(root: Path | str, is_xray: bool | None = None, val_fraction: float = 0.1,
                     test_fraction: float = 0.1) -> list[Record]:
    """Folder-per-class trees (LERA, AASCE spine, dental, ImageNet negatives, …).

    ``root/<class>/**/image`` — or ``root/<split>/<class>/**/image`` when train/val/test folders exist.
    A class named after a body part is a radiograph of it; any other class name is a non-X-ray kind
    unless ``is_xray`` forces it. Without split folders, splits come from a stable hash of the
    file's parent folder (a study or patient folder stays together).
    """
    root = Path(root)
    split_dirs = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    layouts = split_dirs.items() if split_dirs else [(None, root)]
    records = []
    for split, base in layouts:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            label = class_dir.name.lower()
            radiograph = label in BODY_PARTS if is_xray is None else is_xray
            for path in sorted(class_dir.rglob("*")):
                if path.suffix.lower() not in EXTENSIONS:
                    continue
                record_split = split or _split_by_hash(str(path.parent.relative_to(root)) + path.stem
                                                       if path.parent == class_dir else
                                                       str(path.parent.relative_to(root)),
                                                       val_fraction, test_fraction)
                records.append(
                    Record(
                        path=path,
                        split=record_split,
                        is_xray=radiograph,
                        body_part=label if radiograph and label in BODY_PARTS else None,
                        kind="radiograph" if radiograph else label,
                        source=root.name,
                    )
                )
    return records


def load_sources(manifest: Iterable[str] = (), chestxray14: Iterable[str] = (), mura: Iterable[str] = (),
                 folders: Iterable[str] = ()) -> list[Record]:
    records: list[Record] = []
    for path in manifest:
        records += load_manifest(path)
    for path in chestxray14:
        records += load_chestxray14(path)
    for path in mura:
        records += load_mura(path)
    for path in folders:
        records += load_folder_tree(path)
    if not records:
        raise SystemExit("no training data: give --manifest, --chestxray14, --mura or --folders")
    return records


def _find(root: Path, name: str) -> Path:
    matches = sorted(root.rglob(name))
    if not matches:
        raise FileNotFoundError(f"{name} not found under {root}")
    return matches[0]


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def by_file_name(record: Record) -> str:
    """A sort key that is the same on every machine and run: choose "the first N" records by it."""
    return hashlib.sha256(record.path.name.encode()).hexdigest()


def _split_by_hash(key: str, val_fraction: float, test_fraction: float) -> str:
    value = _stable_fraction(key)
    if value < test_fraction:
        return "test"
    return "val" if value < test_fraction + val_fraction else "train"


def labelled_films(records: list[Record], split: str) -> list[Record]:
    """NIH chest films of ``split`` with all 14 labels known (as ``training evaluate`` reports them)."""
    return [r for r in records if r.split == split and r.source in NIH_SOURCES and r.body_part == "chest"
            and r.chest_labels is not None and all(v is not None for v in r.chest_labels)]


def targets(records: list[Record]) -> np.ndarray:
    """(N, 14) 0/1 labels in CHEST_LABELS order."""
    return np.asarray([r.chest_labels for r in records], dtype=np.float64).reshape(len(records), len(CHEST_LABELS))
