"""Running a torch network on the training side: the device, bf16 autocast and predictions over a dataset
(shared by fit/ and measure/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.images import RecordDataset


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA and on CPUs with native bf16 (measured 1.6× faster here than fp32)."""
    enabled = device.type == "cuda" or (torch.backends.mkldnn.is_available() and _cpu_has_bf16())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def predict(model: torch.nn.Module, dataset: RecordDataset, batch_size: int, device: torch.device,
            activation: str, progress: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, targets and mean loss over a dataset, without augmentation."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval()
    outputs, targets, losses = [], [], []
    with torch.inference_mode():
        for images, target in tqdm(loader, desc=progress, disable=progress is None, leave=False):
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                logits = model(images).float()
            target = target.to(device)
            losses.append(_loss(logits, target, activation).item() * len(images))
            probs = torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
            outputs.append(probs.cpu().numpy())
            targets.append(target.cpu().numpy())
    n = max(1, len(dataset))
    return np.concatenate(outputs), np.concatenate(targets), float(sum(losses) / n)


def _loss(logits: torch.Tensor, target: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.nn.functional.cross_entropy(logits, target)
    return masked_bce(logits, target)


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the known targets only: NaN (unknown) gives no loss and no gradient.
    With every target known this is the usual mean over all outputs."""
    known = ~torch.isnan(target)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.where(known, target, torch.zeros_like(target)), reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)
