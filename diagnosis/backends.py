"""How a DenseNet runs: eager PyTorch (CPU or CUDA), ONNX Runtime (CPU) or OpenVINO (CPU).

Every runner takes a float32 batch (N, 1, S, S) and returns (logits, post-ReLU feature maps) as
float32 numpy arrays: the features of the same forward pass give the heatmap (CAM) for free.
``runner(batch, block3=True)`` also returns the block-3 map (``DenseNetClassifier.forward_block3``,
8 × 8 at 128 px) of the same pass, for the finer heatmap; asked only for films that get an overlay.
ONNX files are exported from the verified safetensors weights and cached by their sha256, so a
changed model never reuses a stale export. OpenVINO reads the same cached ONNX file and keeps its
compiled blob in the same cache folder (its ``CACHE_DIR``), so a restart skips compilation.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .cards import ModelCard
from .config import BACKENDS, DEFAULT_CACHE_DIR
from .network import DenseNetClassifier

log = logging.getLogger(__name__)


GPU_BUCKETS = (1, 8, 32, 128)  # CUDA: batches are padded to one of these fixed sizes


class TorchRunner:
    """``channels_last=False`` is the naive baseline the benchmark compares against.

    ``buckets`` (default on CUDA: 1/8/32/128): a batch is padded with zeros to the next bucket
    (larger ones run in chunks of the largest), so kernels are picked, and ``compile``d graphs
    captured, for a few fixed shapes only; the padding rows are dropped from the answer. On CUDA the
    batch goes through a pinned host buffer (one per thread and shape) with a non-blocking copy,
    under bf16 autocast. ``compile``: ``torch.compile`` of the forward pass (on CUDA mode
    "reduce-overhead", i.e. CUDA graphs per bucket); the forward passes of concurrent threads are
    serialised (one GPU stream; graph replays reuse their output buffers), while their decode and
    overlay run in parallel outside it."""

    def __init__(self, network: DenseNetClassifier, device: torch.device, channels_last: bool = True,
                 buckets: tuple[int, ...] | None = None, compile: bool = False):
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = network.to(device).to(memory_format=self.memory_format).eval()
        cuda = device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
        self.buckets = tuple(sorted(set(buckets))) if buckets is not None else (GPU_BUCKETS if cuda else ())
        self.forward = self.network.forward_with_features
        self.forward_block3 = self.network.forward_with_block3  # overlays only: not compiled
        if compile:
            self.forward = torch.compile(self.forward, mode="reduce-overhead" if cuda else None, dynamic=False)
        self._gpu = threading.Lock()
        self._local = threading.local()

    def padded_size(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), n)

    def _host(self, batch: np.ndarray) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(batch)
        buffers = self._local.__dict__.setdefault("pinned", {})
        if batch.shape not in buffers:
            buffers[batch.shape] = torch.empty(batch.shape, dtype=torch.float32, pin_memory=True)
        host = buffers[batch.shape]
        host.numpy()[...] = batch
        return host

    def _run(self, batch: np.ndarray, block3: bool = False) -> tuple[np.ndarray, ...]:
        n = len(batch)
        size = self.padded_size(n)
        if size > n:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)])
        with self._gpu:
            x = self._host(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            cuda = self.device.type == "cuda"
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                outputs = (self.forward_block3 if block3 else self.forward)(x)
            return tuple(output[:n].float().cpu().numpy() for output in outputs)

    def warm_up(self, channels: int, size: int) -> None:
        """One forward pass per bucket, at start: cuDNN autotuning (and graph capture when compiled)
        happens before the first task, not inside a task's time limit."""
        for bucket in self.buckets:
            self._run(np.zeros((bucket, channels, size, size), dtype=np.float32))

    def __call__(self, batch: np.ndarray, block3: bool = False) -> tuple[np.ndarray, ...]:
        largest = self.buckets[-1] if self.buckets else len(batch)
        if len(batch) <= largest:
            return self._run(batch, block3)
        parts = [self._run(batch[i:i + largest], block3) for i in range(0, len(batch), largest)]
        return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))


class _LogitsAndFeatures(torch.nn.Module):
    def __init__(self, network: DenseNetClassifier):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.network.forward_with_block3(x)


OUTPUTS = ("logits", "features", "block3")  # the exported graph's outputs (block3: the finer heatmap's map)


def export_onnx(network: DenseNetClassifier, card: ModelCard, path: Path) -> Path:
    """Export once; the legacy exporter (dynamo=False) is fast and needs no onnxscript."""
    size = card.input.size
    example = torch.zeros(1, card.input.channels, size, size)
    buffer = io.BytesIO()
    # A copy in eval mode: exporting a module in training mode would update BatchNorm statistics.
    wrapper = _LogitsAndFeatures(copy.deepcopy(network).float().cpu()).eval()
    wrapper = wrapper.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), buffer, input_names=["input"],
                          output_names=list(OUTPUTS), opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)  # atomic: concurrent workers never read half a file
    return path


def cached_onnx(network: DenseNetClassifier, card: ModelCard, cache_dir: Path) -> Path:
    """The model's ONNX export in ``cache_dir``, named by its weights hash; exported on first use."""
    flip = "-flip" if card.flip_average else ""
    # "-b3": exports with the block-3 output; an older cached export (two outputs) is not reused.
    path = Path(cache_dir) / f"{card.name}-{card.weights.sha256[:16]}-{card.input.size}-b3{flip}.onnx"
    if not path.is_file():
        log.info("exporting %s to ONNX at %s", card.name, path)
        export_onnx(network, card, path)
    return path


def default_threads(threads: int | None) -> int:
    """Intra-op threads of a CPU backend: the setting (TORCH_THREADS), else up to 2."""
    return threads or min(2, os.cpu_count() or 1)


class OnnxRunner:
    def __init__(self, network: DenseNetClassifier, card: ModelCard, cache_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        path = cached_onnx(network, card, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = default_threads(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Three models run one after another: spinning idle threads of one session would steal the
        # cores from the next (measured: 36 → 13 ms per model at 128 px on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray, block3: bool = False) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(list(OUTPUTS[:3 if block3 else 2]), {"input": np.ascontiguousarray(batch)}))


class OpenVinoRunner:
    """OpenVINO on the CPU, from the cached ONNX export. ``precision`` "f32" (default) keeps the
    torch/ONNX answers; OpenVINO's own default on CPUs with AVX-512 BF16 or AMX would be bf16, so it
    is pinned here and changed only on purpose (``python -m training evaluate --backend`` measures it).
    One infer request per calling thread: a compiled model is shared, requests are not thread-safe."""

    def __init__(self, network: DenseNetClassifier, card: ModelCard, cache_dir: Path, threads: int | None = None,
                 precision: str = "f32"):
        import openvino as ov

        path = cached_onnx(network, card, cache_dir)
        core = ov.Core()
        blobs = Path(cache_dir) / "openvino"
        blobs.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(blobs)})  # compiled blobs, keyed by model and settings
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log.warning("this CPU has no native bf16; %s runs at f32", card.name)  # emulation would be slower
            precision = "f32"
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": default_threads(threads),
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        })
        self.precision = precision
        self._local = threading.local()

    def __call__(self, batch: np.ndarray, block3: bool = False) -> tuple[np.ndarray, ...]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        outputs = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        # Copies: the request reuses its output buffers on the next call.
        return tuple(np.array(outputs[name], copy=True) for name in OUTPUTS[:3 if block3 else 2])


def make_runner(backend: str, network: DenseNetClassifier, card: ModelCard, device: torch.device,
                cache_dir: Path = DEFAULT_CACHE_DIR, threads: int | None = None,
                buckets: tuple[int, ...] | None = None, compile: bool = False):
    if backend == "eager":
        return TorchRunner(network, device, channels_last=False, buckets=())
    if backend == "torch":
        runner = TorchRunner(network, device, buckets=buckets, compile=compile)
        if device.type == "cuda" or compile:
            runner.warm_up(card.input.channels, card.input.size)
        return runner
    if backend == "onnx":
        if device.type != "cpu":
            raise ValueError("the onnx backend runs on the CPU; use backend=torch for CUDA")
        return OnnxRunner(network, card, cache_dir, threads)
    if backend in ("openvino", "openvino-bf16"):
        if device.type != "cpu":
            raise ValueError("the openvino backend runs on the CPU; use backend=torch for CUDA")
        try:
            return OpenVinoRunner(network, card, cache_dir, threads, "bf16" if backend.endswith("bf16") else "f32")
        except ImportError:  # the worker extra installs it; ONNX Runtime is the fallback
            log.warning("openvino is not installed; %s runs on ONNX Runtime", card.name)
            return OnnxRunner(network, card, cache_dir, threads)
    raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
