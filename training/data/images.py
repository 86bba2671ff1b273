"""Torch datasets over records: decode once through the intake, augment, then the shared preprocessing."""

from __future__ import annotations

import multiprocessing
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from diagnosis.intake import ImageRejected, decode
from diagnosis.photo import models_view
from diagnosis.preprocess import resize_gray, to_model_input

from .datasets import Record, by_file_name
from .tasks import Task


def load_gray(record: Record, max_side: int | None) -> Image.Image:
    """Decode a file through the same intake as the service; optionally shrink it for the cache.

    Like the service, a photographed film is straightened first (DICOM is digital: left alone), so
    the models train on what they will be shown.
    """
    decoded = decode(record.path.read_bytes())
    gray = models_view(decoded).gray
    image = Image.fromarray(gray, mode="L")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image


class Augment:
    """Geometry, contrast, and *resolution* jitter applied to every class alike.

    Random down-then-up sampling equalises effective resolution across sources (the pack's chest
    images are 128 px, others far larger), so "blurry" cannot stand in for "chest".
    """

    def __init__(self, size: int, flip: bool = True, seed: int = 0, quarter_turns: float = 0.0):
        """``quarter_turns``: the share of images turned by 90, 180 or 270 degrees (films sent sideways
        or upside down), every class alike."""
        self.size = size
        self.quarter_turns = quarter_turns
        self.last_turn = 0  # quarter turns given to the last image (the turn loss asks the network for it)
        self.rng = random.Random(seed)  # nosec B311 - augmentation, not security
        self.geometry = v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.85, 1.15))
        self.colour = v2.ColorJitter(brightness=0.3, contrast=0.35)
        self.flip = v2.RandomHorizontalFlip() if flip else None

    def __call__(self, image: Image.Image) -> Image.Image:
        image = resize_gray(image, self.size)
        if self.rng.random() < 0.5:
            low = self.rng.randint(max(24, self.size // 4), self.size)
            image = image.resize((low, low), Image.Resampling.BILINEAR).resize(
                (self.size, self.size), Image.Resampling.BILINEAR)
        image = self.geometry(image)
        image = self.colour(image)
        if self.flip is not None:
            image = self.flip(image)
        if self.rng.random() < 0.3:  # gamma: exposure differences between machines and phone shots
            gamma = self.rng.uniform(0.7, 1.4)
            lut = [min(255, round(255 * (i / 255) ** gamma)) for i in range(256)]
            image = image.point(lut)
        self.last_turn = 0
        if self.quarter_turns and self.rng.random() < self.quarter_turns:
            self.last_turn = self.rng.randint(1, 3)
            image = quarter_turn(image, self.last_turn)
        return image


def quarter_turn(image: Image.Image, turns: int) -> Image.Image:
    """``turns`` × 90 degrees anticlockwise (a square input stays square)."""
    return image.rotate(90 * (turns % 4), expand=True) if turns % 4 else image


class RecordDataset(Dataset):
    def __init__(self, records: list[Record], task: Task, size: int, mean: float, std: float,
                 augment: Augment | None = None, cache: dict | None = None, cache_side: int | None = None,
                 fixed_turns: bool = False, with_turns: bool = False):
        """``cache_side=None`` keeps full resolution: evaluation then resizes exactly as the service.
        ``fixed_turns``: each image shown turned by 0/90/180/270 degrees, the same every time (chosen
        from its file name): a validation set that also asks for turned films. ``with_turns``: items
        are (pixels, target, quarter turns given), the turns -1 for a non-X-ray (no upright to learn)."""
        self.records, self.task, self.size, self.mean, self.std = records, task, size, mean, std
        self.augment, self.cache_side, self.fixed_turns = augment, cache_side, fixed_turns
        self.with_turns = with_turns
        self.cache = cache if cache is not None else {}

    def __len__(self) -> int:
        return len(self.records)

    def warm(self, processes: int) -> None:
        """Decode every record once in parallel, before DataLoader workers fork and share the cache."""
        missing = [i for i, r in enumerate(self.records) if r.path not in self.cache]
        if processes <= 1 or not missing:
            return
        global _warming
        _warming = self  # forked processes inherit it: only indices and decoded images cross over
        try:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                for index, image in zip(missing, pool.imap(_decode, missing, chunksize=16), strict=True):
                    self.cache[self.records[index].path] = image
        finally:
            _warming = None

    def reseed(self, seed: int) -> None:
        """Give each DataLoader worker its own augmentation stream (forked workers share the parent's)."""
        if self.augment is not None:
            self.augment.rng.seed(seed)

    def image(self, index: int) -> Image.Image:
        record = self.records[index]
        image = self.cache.get(record.path)
        if image is None:
            try:
                image = load_gray(record, max_side=self.cache_side)
            except (ImageRejected, OSError):
                image = Image.new("L", (self.size, self.size))  # keep batch shape; counted as noise
            self.cache[record.path] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        record = self.records[index]
        image = self.image(index)
        turns = 0
        if self.augment is not None:
            image = self.augment(image)
            turns = self.augment.last_turn
        if self.fixed_turns:
            turns = int(by_file_name(record)[:2], 16) % 4
            image = quarter_turn(image, turns)
        pixels = torch.from_numpy(np.ascontiguousarray(to_model_input(image, self.size, self.mean, self.std)))
        target = torch.as_tensor(self.task.target(record))
        if self.with_turns:
            return pixels, target, torch.as_tensor(turns if record.is_xray else -1)
        return pixels, target


_warming: RecordDataset | None = None


def _decode(index: int) -> Image.Image:
    return _warming.image(index)
