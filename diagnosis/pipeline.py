"""The paper's four modules on one image: gate → body part → abnormality model → heatmap → overlay.

Early exits carry their reason (not an X-ray; a body part with no abnormality model yet; body part
uncertain). Thresholds come from the cards. The abnormality stage is looked up by body part from
the cards present, so a model for another body part plugs in by adding a folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cards import CardError, ModelCard, discover
from .heatmap import class_activation_map, grad_cam
from .intake import DecodedImage, ImageRejected, decode
from .messages import render_reply
from .network import DenseNetClassifier, load_model
from .overlay import encode_png, render_overlay
from .preprocess import to_model_input
from .report import DiagnosisResult, Finding

MAX_HEATMAP_PANELS = 3


@dataclass
class LoadedModel:
    folder: Path
    card: ModelCard
    network: DenseNetClassifier
    device: torch.device

    def tensor(self, decoded: DecodedImage, cache: dict) -> torch.Tensor:
        """Resize once per input contract: models sharing a size share the tensor."""
        spec = self.card.input
        key = (spec.size, spec.mean, spec.std)
        if key not in cache:
            pixels = to_model_input(decoded.gray, spec.size, spec.mean, spec.std)
            cache[key] = torch.from_numpy(pixels)[None].to(self.device)
        return cache[key]

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        logits = logits.float()
        probs = torch.softmax(logits, 1) if self.card.activation == "softmax" else torch.sigmoid(logits)
        return probs[0].cpu().numpy()


@dataclass
class Analysis:
    result: DiagnosisResult
    overlay_png: bytes | None = None


class Pipeline:
    def __init__(self, gate: LoadedModel, body_part: LoadedModel, abnormality: dict[str, LoadedModel],
                 heatmap: str = "cam"):
        if heatmap not in ("cam", "gradcam"):
            raise ValueError("heatmap must be 'cam' or 'gradcam'")
        self.gate, self.body_part, self.abnormality, self.heatmap = gate, body_part, abnormality, heatmap

    @classmethod
    def load(cls, models_dir: Path | str = "models", device: str = "cpu", heatmap: str = "cam",
             abnormality_models: dict[str, str] | None = None) -> Pipeline:
        """Load every model folder under ``models_dir``.

        ``abnormality_models`` maps a body part to a model folder (absolute, or a name under
        ``models_dir``), e.g. {"chest": "chest_xrv"} to switch the chest model.
        """
        torch_device = torch.device(device)
        folders = discover(models_dir)
        by_role: dict[str, list[Path]] = {"gate": [], "body_part": [], "abnormality": []}
        for folder, card in folders.values():
            by_role[card.role].append(folder)
        for role in ("gate", "body_part"):
            if len(by_role[role]) != 1:
                raise CardError(f"need exactly one {role} model in {models_dir}, found {len(by_role[role])}")
        loaded = {folder: LoadedModel(folder, *load_model(folder, torch_device), torch_device)
                  for folder in by_role["gate"] + by_role["body_part"]}
        abnormality: dict[str, LoadedModel] = {}
        chosen = dict(abnormality_models or {})
        for folder in by_role["abnormality"]:
            card = folders[folder.name][1]
            if card.body_part in chosen or card.body_part in abnormality:
                continue  # an explicit choice or an earlier folder wins; duplicates are not loaded
            abnormality[card.body_part] = LoadedModel(folder, *load_model(folder, torch_device), torch_device)
        for part, name in chosen.items():
            folder = Path(name) if Path(name).is_absolute() else Path(models_dir) / name
            model = LoadedModel(folder, *load_model(folder, torch_device), torch_device)
            if model.card.role != "abnormality" or model.card.body_part != part:
                raise CardError(f"{folder.name!r} is not an abnormality model for {part!r}")
            abnormality[part] = model
        return cls(loaded[by_role["gate"][0]], loaded[by_role["body_part"][0]], abnormality, heatmap)

    @property
    def versions(self) -> dict[str, str]:
        models = [self.gate, self.body_part, *self.abnormality.values()]
        return {m.card.name: m.card.version for m in models}

    def run(self, data: bytes, file: str | None = None, make_overlay: bool = True) -> Analysis:
        """Analyse one image. Never raises for bad input: that becomes outcome "rejected"."""
        timings: dict[str, float] = {}
        started = clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round((now - clock) * 1000, 2)
            clock = now

        try:
            decoded = decode(data)
        except ImageRejected as rejected:
            lap("decode")
            result = DiagnosisResult(file=file, outcome="rejected", rejection=rejected.code, timings_ms=timings,
                                     models=self.versions)
            return Analysis(self._finish(result, started))
        lap("decode")
        with torch.inference_mode():
            analysis = self._analyse(decoded, file, make_overlay, lap)
        analysis.result.timings_ms = timings
        self._finish(analysis.result, started)
        return analysis

    def _analyse(self, decoded: DecodedImage, file: str | None, make_overlay: bool, lap) -> Analysis:
        inputs: dict = {}
        result = DiagnosisResult(file=file, outcome="analysed", input_format=decoded.format, models=self.versions)

        gate_input = self.gate.tensor(decoded, inputs)
        lap("preprocess")
        gate_card = self.gate.card
        gate_probs = self.gate.probabilities(self.gate.network(gate_input))
        result.xray_probability = float(gate_probs[gate_card.labels.index(gate_card.positive_label)])
        result.is_xray = result.xray_probability >= gate_card.threshold(gate_card.positive_label)
        lap("gate")
        if not result.is_xray:
            result.outcome = "not_xray"
            return Analysis(result)

        part_probs = self.body_part.probabilities(self.body_part.network(self.body_part.tensor(decoded, inputs)))
        top = int(part_probs.argmax())
        result.body_part_probability = float(part_probs[top])
        lap("body_part")
        if result.body_part_probability < (self.body_part.card.min_confidence or 0.0):
            result.outcome = "body_part_uncertain"
            return Analysis(result)
        result.body_part = self.body_part.card.labels[top]
        model = self.abnormality.get(result.body_part)
        if model is None:
            result.outcome = "body_part_not_analysed"
            return Analysis(result)

        model_input = model.tensor(decoded, inputs)
        features = model.network.forward_features(model_input)
        probs = model.probabilities(model.network.head(features))
        card = model.card
        result.findings = sorted(
            (Finding(label=label, probability=float(p), positive=bool(p >= card.threshold(label)),
                     threshold=card.threshold(label)) for label, p in zip(card.labels, probs, strict=True)),
            key=lambda f: f.probability, reverse=True)
        lap(result.body_part)
        if not make_overlay:
            return Analysis(result)

        drawn = result.positive_findings[:MAX_HEATMAP_PANELS] or result.findings[:1]
        result.heatmap_labels = [f.label for f in drawn]
        maps = []
        for finding in drawn:
            index = card.labels.index(finding.label)
            if self.heatmap == "gradcam":
                heat = grad_cam(model.network, model_input.clone(), index)
            else:
                heat = class_activation_map(model.network, features, index)
            maps.append((f"{finding.label} {finding.probability:.0%}", heat))
        lap("heatmap")
        overlay = encode_png(render_overlay(decoded.gray, maps))
        lap("overlay")
        return Analysis(result, overlay)

    @staticmethod
    def _finish(result: DiagnosisResult, started: float) -> DiagnosisResult:
        result.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 2)
        result.message = render_reply(result, "en")
        return result
