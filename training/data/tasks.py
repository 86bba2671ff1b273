"""The three classification tasks of the paper and how a record becomes a target."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .datasets import CHEST_LABELS, GATE_LABELS, Record


@dataclass(frozen=True)
class Task:
    name: str  # gate / body_part / chest
    labels: list[str]
    activation: str  # softmax / sigmoid
    # network outputs after the labels (chest: "abnormal", any finding); not findings themselves
    extra_outputs: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        return self.labels + self.extra_outputs

    def applies(self, record: Record) -> bool:
        if self.name == "gate":
            return True
        if self.name == "body_part":
            return record.is_xray and record.body_part in self.labels
        return record.body_part == "chest" and not np.isnan(self.target(record)).all()

    def target(self, record: Record) -> np.ndarray:
        """Class index (softmax) as int64 scalar, or a float32 vector over ``outputs`` (sigmoid)
        where NaN marks an unknown value: the loss skips it."""
        if self.name == "gate":
            return np.int64(GATE_LABELS.index("xray" if record.is_xray else "not_xray"))
        if self.name == "body_part":
            return np.int64(self.labels.index(record.body_part))
        values = {**dict(zip(CHEST_LABELS, record.chest_labels or [None] * len(CHEST_LABELS), strict=True)),
                  "abnormal": record.abnormal}
        return np.asarray([np.nan if values[name] is None else values[name] for name in self.outputs],
                          dtype=np.float32)

    def balance_group(self, record: Record) -> str:
        """Records are sampled so each group weighs the same: hard negatives (fundus, MRI, phone
        photos of films) would otherwise drown in thousands of chest images."""
        origin = "synthetic" if record.synthetic else "real"
        if self.name == "gate":
            if record.phone_photo:  # real and synthetic photos: three groups, so they add to the mix without ruling it
                return f"phone_photo/{'xray' if record.is_xray else 'not_xray'}/{origin}"
            return f"{record.kind}/{record.body_part or ''}"
        if self.name == "body_part":
            return f"phone_photo/{origin}" if record.phone_photo else str(record.body_part)
        return record.source  # chest: sources differ in hospital, device and population


def make_task(name: str, records: list[Record], min_count: int = 30) -> Task:
    if name == "gate":
        return Task("gate", list(GATE_LABELS), "softmax")
    if name == "chest":
        return Task("chest", list(CHEST_LABELS), "sigmoid", ["abnormal"])
    if name == "body_part":
        counts = Counter(r.body_part for r in records if r.is_xray and r.split == "train" and r.body_part
                         and not r.synthetic)  # parts known from real images only
        parts = sorted(part for part, count in counts.items() if count >= min_count)
        if len(parts) < 2:
            raise SystemExit(f"body_part needs ≥ 2 body parts with ≥ {min_count} train images; have {dict(counts)}")
        return Task("body_part", parts, "softmax")
    raise SystemExit(f"unknown task {name!r}: use gate, body_part or chest")
