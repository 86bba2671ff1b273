"""One pipeline configuration, built from the service settings (workers) or from CLI flags.

The defaults live here and nowhere else. Models: ``MODELS_DIR`` when set, otherwise the
repository's ``models/`` folder, found from this package's location (not the working directory),
so the CLI, the workers and the benchmark read the same models from anywhere. No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contract.settings import BACKENDS, HEATMAPS, Backend, Heatmap

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "xray-second-opinion"  # ONNX exports, by weights hash

__all__ = ["BACKENDS", "HEATMAPS", "Backend", "Heatmap", "PipelineConfig"]


def models_dir_from_environment() -> Path:
    """``MODELS_DIR`` when set (and not empty), else the repository's models/ (the workers read the
    same variable through their settings)."""
    return Path(os.environ.get("MODELS_DIR") or DEFAULT_MODELS_DIR)


def cache_dir_from_environment() -> Path:
    """``XRAY_CACHE_DIR`` when set (and not empty), else ``DEFAULT_CACHE_DIR``."""
    return Path(os.environ.get("XRAY_CACHE_DIR") or DEFAULT_CACHE_DIR)


@dataclass(frozen=True)
class PipelineConfig:
    models_dir: Path = DEFAULT_MODELS_DIR
    # "torch" (CPU or CUDA: channels_last, bf16 autocast on CUDA), "onnx" (ONNX Runtime, CPU;
    # exported from the weights at start, cached in ``cache_dir``), "openvino" (OpenVINO, CPU, from
    # the same cached ONNX export; ONNX Runtime when openvino is missing), "openvino-bf16" (the same at
    # bf16 where the CPU has it: pack-test chest AUC and gate/body-part accuracy measured equal within
    # 0.001, see docs/performance.md) or "eager" (naive fp32 baseline).
    backend: Backend = "torch"
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    threads: int | None = None  # intra-op threads of every backend (torch, ONNX Runtime, OpenVINO); None = default
    heatmap: Heatmap = "cam"  # cam: from the forward pass (equal to Grad-CAM here); gradcam: pytorch-grad-cam
    # Body part → model folder (absolute, or a name under models_dir), e.g. {"chest": "chest_xrv"};
    # body parts not named use the abnormality model found in models_dir.
    abnormality_models: dict[str, str] = field(default_factory=dict)
    cache_dir: Path = DEFAULT_CACHE_DIR
    photo_step: bool = True  # find/straighten the film in phone photos, refuse bad shots
    # backend "torch": pad batches to these fixed sizes (None: 1/8/32/128 on CUDA, none on the CPU)
    # and torch.compile the forward pass (CUDA graphs per size on CUDA).
    batch_buckets: tuple[int, ...] | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.heatmap not in HEATMAPS:
            raise ValueError(f"heatmap must be one of {', '.join(HEATMAPS)}")
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def with_options(self, **options: Any) -> PipelineConfig:
        """A copy with some fields replaced (``None`` keeps the current value)."""
        return replace(self, **{name: value for name, value in options.items() if value is not None})

    @classmethod
    def from_settings(cls, settings: Any) -> PipelineConfig:
        """The workers' configuration from ``contract.settings.ServiceSettings`` (unset → the defaults above)."""
        return cls().with_options(
            models_dir=settings.MODELS_DIR,
            backend=settings.BACKEND,
            device=settings.DEVICE,
            threads=settings.TORCH_THREADS,
            heatmap=settings.HEATMAP,
            abnormality_models=dict(settings.ABNORMALITY_MODELS) or None,
            cache_dir=settings.XRAY_CACHE_DIR,
            compile=getattr(settings, "TORCH_COMPILE", None) or None,
        )
