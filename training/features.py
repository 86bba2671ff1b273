"""Logits and pooled features of one model folder, on images seen exactly as the service sees them.

Each image goes through ``diagnosis.intake.decode``, the photo step (``diagnosis.photo.models_view``,
skipped for DICOM as in ``diagnosis.pipeline``), ``diagnosis.preprocess.to_model_input`` and the
model's ONNX Runtime runner (``diagnosis.backends``), so what is fitted here on pooled features is
what the pipeline computes at inference. Results are cached per (weights hash, image path) in a
safetensors file under ``cache`` (never in the repository); no pickle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from diagnosis.backends import make_runner
from diagnosis.cards import InputSpec
from diagnosis.intake import ImageRejected, decode
from diagnosis.network import load_model
from diagnosis.photo import Rectified, models_view
from diagnosis.preprocess import to_model_input

log = logging.getLogger(__name__)


def service_read(path: Path) -> Rectified | None:
    """What the models see of the file at ``path`` (decode, then the photo step), with whether the
    photo step straightened it; None when the service's intake refuses the file (it never reaches
    the models)."""
    try:
        decoded = decode(Path(path).read_bytes())
    except ImageRejected:
        return None
    return models_view(decoded)


def service_view(path: Path) -> np.ndarray | None:
    """The grayscale image the models see for the file at ``path``; None when the intake refuses it."""
    view = service_read(path)
    return None if view is None else view.gray


def service_logits(runner, spec: InputSpec, paths: list[Path], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits of ``runner`` (``diagnosis.backends``) on the files the intake reads, and the mask of
    those files over ``paths``: a refused file is dropped, as the service never runs it."""
    logits, read = [], np.zeros(len(paths), bool)
    for start in range(0, len(paths), batch):
        views = [service_view(p) for p in paths[start:start + batch]]
        ok = [i for i, view in enumerate(views) if view is not None]
        read[[start + i for i in ok]] = True
        if ok:
            logits.append(runner(model_batch([views[i] for i in ok], spec))[0])
    return (np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)), read


def model_batch(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """The card's preprocessing (``diagnosis.preprocess.to_model_input``) of gray images, stacked."""
    return np.stack([to_model_input(g, spec.size, spec.mean, spec.std) for g in images])


def drop_refused(rows: list, *arrays: np.ndarray) -> tuple[list, list[np.ndarray], int]:
    """Leave out the rows whose file the intake refused (NaN outputs: the service never runs them);
    returns the rows and arrays kept and how many were refused (reported as ``refused_by_intake``)."""
    first = arrays[0].reshape(len(arrays[0]), -1)
    read = np.isfinite(first[:, 0]) if first.shape[1] else np.ones(len(first), bool)
    if not read.all():
        log.info("%d of %d files refused by the intake, left out", int((~read).sum()), len(read))
    return ([r for r, ok in zip(rows, read, strict=True) if ok], [a[read] for a in arrays], int((~read).sum()))


class FeatureStore:
    """``outputs(paths)`` → (logits (N, outputs), pooled features (N, 1024)); missing rows are computed.

    ``spatial=True`` keeps the whole post-ReLU map instead (N, 1024·H·W, float16: the orientation head
    needs to know where things are, which pooling forgets).
    Rows of files the intake refuses are NaN (callers drop them: the service never runs them)."""

    def __init__(self, model_folder: Path | str, cache: Path | str, threads: int = 2, spatial: bool = False):
        self.card, self.network = load_model(model_folder, "cpu")
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        kind = "-spatial" if spatial else ""
        self.file = self.cache / f"{self.card.name}-{self.card.weights.sha256[:16]}{kind}.safetensors"
        self.threads, self.spatial = threads, spatial
        self.rows: dict[str, int] = {}
        self.logits = np.zeros((0, len(self.card.outputs)), np.float32)
        side = -(-self.card.input.size // 32)  # DenseNet-121 downsamples by 32
        self.pooled = (np.zeros((0, 1024 * side * side), np.float16) if spatial
                       else np.zeros((0, 1024), np.float32))
        if self.file.is_file():
            tensors = load_file(str(self.file))
            self.logits, self.pooled = tensors["logits"], tensors["pooled"]
            keys = json.loads(self.file.with_suffix(".json").read_text())
            self.rows = {key: i for i, key in enumerate(keys)}
        self._runner = None

    def _run(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self._runner is None:
            self._runner = make_runner("onnx", self.network, self.card, torch.device("cpu"),
                                       self.cache / "onnx", self.threads)
        logits, maps = self._runner(model_batch(images, self.card.input))
        if self.spatial:
            return logits.astype(np.float32), maps.reshape(len(maps), -1).astype(np.float16)
        return logits.astype(np.float32), maps.mean(axis=(2, 3)).astype(np.float32)

    def outputs(self, paths: list[Path], views=None) -> tuple[np.ndarray, np.ndarray]:
        """Rows for ``paths``; ``views`` (path → gray image) replaces reading the file (synthetic images)."""
        keys = [str(p) for p in paths]
        missing = [k for k in dict.fromkeys(keys) if k not in self.rows]
        new_logits, new_pooled = [self.logits], [self.pooled]  # one concatenation per save, not per chunk
        for start in range(0, len(missing), 32):
            chunk = missing[start:start + 32]
            images = [views(k) if views else service_view(Path(k)) for k in chunk]
            logits = np.full((len(chunk), self.logits.shape[1]), np.nan, np.float32)
            pooled = np.full((len(chunk), self.pooled.shape[1]), np.nan, self.pooled.dtype)
            ok = [i for i, image in enumerate(images) if image is not None]
            if ok:
                logits[ok], pooled[ok] = self._run([images[i] for i in ok])
            offset = len(self.rows)
            self.rows.update({k: offset + i for i, k in enumerate(chunk)})
            new_logits.append(logits)
            new_pooled.append(pooled)
            if start % 1024 == 0:
                log.info("%s: %d / %d forward passes", self.card.name, start + len(chunk), len(missing))
                self.logits, self.pooled = np.concatenate(new_logits), np.concatenate(new_pooled)
                new_logits, new_pooled = [self.logits], [self.pooled]
                self._save()
        if missing:
            self.logits, self.pooled = np.concatenate(new_logits), np.concatenate(new_pooled)
            self._save()
        index = np.asarray([self.rows[k] for k in keys], dtype=np.int64)
        return self.logits[index], self.pooled[index]

    def _save(self) -> None:
        save_file({"logits": self.logits, "pooled": self.pooled}, str(self.file))
        self.file.with_suffix(".json").write_text(json.dumps(list(self.rows)))
