"""The paper's four modules: gate → body part → abnormality model → heatmap → overlay.

Early exits carry their reason (not an X-ray; a body part with no abnormality model yet; body part
uncertain). Thresholds come from the cards. The abnormality stage is looked up by body part from
the cards present, so a model for another body part plugs in by adding a folder.

``run_batch`` takes several images stage by stage (one forward pass per model for the batch) so a
worker can micro-batch; in a batch, a model stage's time is the time of the whole batch.

The pipeline returns data, never text: the reply is rendered at the edge (``diagnosis.messages``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from .backends import make_runner
from .cards import CardError, ModelCard, OpenSetSpec, discover, sha256_of
from .config import HEATMAPS, PipelineConfig
from .heatmap import NormalBaseline, class_evidence, grad_cam, hottest_red_point, without_red
from .intake import DecodedImage, ImageRejected, decode
from .network import DenseNetClassifier, load_model
from .openset import BodyPartNovelty, ModalityHead, OrientationHead
from .operating import MODES, assess, verdict_point
from .overlay import render_overlays
from .photo import models_view
from .preprocess import to_model_input
from .quality import check_quality
from .report import DiagnosisResult

MAX_HEATMAP_PANELS = 3  # overlays per film (one finding each; an album of up to three)


@dataclass
class LoadedModel:
    folder: Path
    card: ModelCard
    network: DenseNetClassifier
    runner: object  # backends.TorchRunner / OnnxRunner: batch → (logits, features)
    novelty: BodyPartNovelty | None = None  # body part: the card's open-set check, when it has one
    modality: ModalityHead | None = None  # gate: names what a refused image is, when the card has one
    orientation: OrientationHead | None = None  # gate: turns a film sent sideways or upside down upright
    baseline: NormalBaseline | None = None  # abnormality: overlays relative to normal films (card ``heatmap``)

    @property
    def input_key(self) -> tuple:
        spec = self.card.input
        return spec.size, spec.mean, spec.std

    def prepare(self, gray: np.ndarray) -> np.ndarray:
        spec = self.card.input
        return to_model_input(gray, spec.size, spec.mean, spec.std)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        if self.card.activation == "softmax":
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            return shifted / shifted.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))  # clip: no overflow warning


@dataclass
class Analysis:
    result: DiagnosisResult
    overlays: list[tuple[str, bytes]] = field(default_factory=list)  # (label, JPEG), one per drawn finding


@dataclass
class _Item:
    result: DiagnosisResult
    decoded: DecodedImage | None = None
    image: np.ndarray | None = None  # what the models see: the decoded image, or the straightened film
    corners: np.ndarray | None = None  # the photo step's film corners in the input's pixels (None: not cropped)
    sent_shape: tuple[int, int] | None = None  # (height, width) of the image as sent, once decoded
    problems: list[str] = field(default_factory=list)  # quality problems: a retake if the gate says X-ray
    inputs: dict = field(default_factory=dict)  # one resized array per input contract
    overlays: list[tuple[str, bytes]] = field(default_factory=list)


class Pipeline:
    def __init__(self, gate: LoadedModel, body_part: LoadedModel, abnormality: dict[str, LoadedModel],
                 heatmap: str = "cam", photo_step: bool = True):
        if heatmap not in HEATMAPS:
            raise ValueError(f"heatmap must be one of {', '.join(HEATMAPS)}")
        self.gate, self.body_part, self.abnormality, self.heatmap = gate, body_part, abnormality, heatmap
        self.photo_step = photo_step  # find/straighten the film in phone photos, refuse bad shots
        self.refuse_bad_shots = True  # False: read every picture whatever the quality check says (measuring)
        # The models' input side: a picture at least this large never has "too few pixels".
        self.input_side = max(m.card.input.size for m in (gate, body_part, *abnormality.values()))
        self.versions = {m.card.name: m.card.version for m in (gate, body_part, *abnormality.values())}
        self.card_hashes = {m.card.name: sha256_of(m.folder / "card.json")
                            for m in (gate, body_part, *abnormality.values()) if (m.folder / "card.json").is_file()}

    @classmethod
    def load(cls, config: PipelineConfig | Path | str | None = None, **options) -> Pipeline:
        """Load every model folder of the configuration once.

        ``config`` is a ``PipelineConfig``, or a models folder (with ``options`` naming other
        ``PipelineConfig`` fields, e.g. ``Pipeline.load(path, backend="onnx")``), or None (defaults).
        """
        if not isinstance(config, PipelineConfig):
            config = PipelineConfig(**({"models_dir": Path(config)} if config is not None else {}))
        config = config.with_options(**options)
        models_dir, torch_device = config.models_dir, torch.device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)  # this thread; workers repeat it in the task thread

        def load_one(folder: Path) -> LoadedModel:
            card, network = load_model(folder, torch_device)
            runner = make_runner(config.backend, network, card, torch_device, config.cache_dir, config.threads,
                                 config.batch_buckets, config.compile)
            novelty = BodyPartNovelty(folder, card.open_set, len(card.labels)) if card.open_set else None
            modality = ModalityHead(folder, card.modality) if card.modality else None
            orientation = OrientationHead(folder, card.orientation) if card.orientation else None
            baseline = NormalBaseline(folder, card.heatmap, card.labels) if card.heatmap else None
            return LoadedModel(folder, card, network, runner, novelty, modality, orientation, baseline)

        folders = discover(models_dir)
        by_role: dict[str, list[Path]] = {"gate": [], "body_part": [], "abnormality": []}
        for folder, card in folders.values():
            by_role[card.role].append(folder)
        for role in ("gate", "body_part"):
            if len(by_role[role]) != 1:
                raise CardError(f"need exactly one {role} model in {models_dir}, found {len(by_role[role])}")
        chosen = dict(config.abnormality_models)
        abnormality: dict[str, LoadedModel] = {}
        for part, name in chosen.items():
            folder = Path(name) if Path(name).is_absolute() else models_dir / name
            model = load_one(folder)
            if model.card.role != "abnormality" or model.card.body_part != part:
                raise CardError(f"{folder.name!r} is not an abnormality model for {part!r}")
            abnormality[part] = model
        for folder in by_role["abnormality"]:
            part = folders[folder.name][1].body_part
            if part not in abnormality:  # an explicit choice or an earlier folder wins
                abnormality[part] = load_one(folder)
        return cls(load_one(by_role["gate"][0]), load_one(by_role["body_part"][0]), abnormality, config.heatmap,
                   config.photo_step)

    def run(self, data: bytes, file: str | None = None, make_overlay: bool = True,
            mode: str = "screening", draw: list[str] | None = None) -> Analysis:
        """Analyse one image. Never raises for bad input: that becomes outcome "rejected".

        ``mode``: "screening" (flags only what the model is good enough at, at a high-specificity
        point) or "clinician" (all labels at their per-label point); see ``diagnosis.operating``.
        ``draw``: labels whose overlays are drawn, red included, whatever the mode flags (for
        measuring where the maps point, ``xray-diagnose --draw``); None: what the reply flags."""
        return self.run_batch([data], [file], make_overlay, [mode], draw)[0]

    def run_batch(self, datas: list[bytes], files: list[str | None] | None = None,
                  make_overlay: bool = True, modes: list[str] | None = None,
                  draw: list[str] | None = None) -> list[Analysis]:
        started = time.perf_counter()
        modes = modes or ["screening"] * len(datas)
        unknown = set(modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown mode(s) {sorted(unknown)}: choose one of {MODES}")
        parts = sorted(self.abnormality)  # what the reply to a film of another part says it can read
        items = [_Item(DiagnosisResult(file=f, outcome="analysed", models=self.versions, model_cards=self.card_hashes,
                                       mode=m, analysable_parts=parts))
                 for f, m in zip(files or [None] * len(datas), modes, strict=True)]
        for item, data in zip(items, datas, strict=True):
            self._read(item, data)

        active = [i for i in items if i.image is not None]
        if active:
            self._gate(active)
            active = [i for i in active if i.result.outcome == "analysed"]
        if active:
            self._body_part(active)
        for part, model in self.abnormality.items():
            chosen = [i for i in active if i.result.outcome == "analysed" and i.result.body_part == part]
            if chosen:
                self._abnormality(model, chosen, part, make_overlay, draw)
        for item in active:
            if item.result.outcome == "analysed" and item.result.body_part not in self.abnormality:
                item.result.outcome = "body_part_not_analysed"
        for item in items:
            item.result.timings_ms["total"] = _ms(started)
        return [Analysis(i.result, i.overlays) for i in items]

    def _read(self, item: _Item, data: bytes) -> None:
        """Decode (a refused file becomes outcome "rejected"), then the photo step."""
        clock = time.perf_counter()
        try:
            item.decoded = decode(data)
            item.result.input_format = item.decoded.format
            item.sent_shape = item.decoded.gray.shape[:2]
        except ImageRejected as rejected:
            item.result.outcome, item.result.rejection = "rejected", rejected.code
        item.result.timings_ms["decode"] = _ms(clock)
        if item.decoded is not None:
            self._photo(item)

    def _photo(self, item: _Item) -> None:
        """Straighten a photographed film; refuse shots too poor to analyse (ask for a retake)."""
        if not self.photo_step or item.decoded.format == "DICOM":  # DICOM is digital: nothing to straighten
            item.image = item.decoded.gray
            return
        clock = time.perf_counter()
        straightened = models_view(item.decoded)
        problems = check_quality(item.decoded.gray, straightened, straightened.photographed, self.input_side)
        item.result.rectified, item.result.photographed = straightened.rectified, straightened.photographed
        item.result.timings_ms["photo"] = _ms(clock)
        item.image, item.problems, item.corners = straightened.gray, problems, straightened.corners

    def _infer(self, model: LoadedModel, items: list[_Item], stage: str,
               block3: bool = False) -> tuple[np.ndarray, ...]:
        """(probabilities, final maps), plus the block-3 maps with ``block3`` (the finer heatmap)."""
        clock = time.perf_counter()
        batch = []
        for item in items:  # resize once per input contract: models of the same size share it
            if model.input_key not in item.inputs:
                item.inputs[model.input_key] = model.prepare(item.image)
            batch.append(item.inputs[model.input_key])
        prepared = _ms(clock)
        clock = time.perf_counter()
        logits, *maps = model.runner(np.stack(batch), block3=True) if block3 else model.runner(np.stack(batch))
        elapsed = _ms(clock)
        for item in items:
            timings = item.result.timings_ms
            timings["preprocess"] = round(timings.get("preprocess", 0.0) + prepared, 2)
            timings[stage] = elapsed
        return (model.probabilities(logits), *maps)

    def _gate(self, items: list[_Item]) -> None:
        card = self.gate.card
        probs, features = self._infer(self.gate, items, "gate")
        index, threshold = card.labels.index(card.positive_label), card.threshold(card.positive_label)
        accepted = probs[:, index] >= threshold
        if self.gate.orientation is not None:
            probs, features = self._turn_upright(items, probs, features, accepted)
            # The head saw non-X-rays at every turn; the gate only upright ones. A picture the head
            # refuses reports the lower of the two views of "is it an X-ray".
            refused, not_xray = self.gate.orientation.not_xray(features)
            if refused.any():
                probs = probs.copy()
                probs[refused, index] = np.minimum(probs[refused, index], 1.0 - not_xray[refused])
            accepted = (probs[:, index] >= threshold) & ~refused
        modalities = self.gate.modality.name(features, accepted) if self.gate.modality else [None] * len(items)
        for item, row, is_xray, modality in zip(items, probs, accepted, modalities, strict=True):
            item.result.xray_probability = float(row[index])
            item.result.is_xray = bool(is_xray)
            item.result.modality = modality
            if not item.result.is_xray:
                item.result.outcome = "not_xray"
            elif item.problems and self.refuse_bad_shots:
                # Asked only once the gate sees an X-ray: a selfie should hear "not an X-ray", not
                # "retake" (quality-first sent 30 of 426 non-X-ray test images a retake request).
                item.result.outcome, item.result.retake = "retake", item.problems

    def _turn_upright(self, items: list[_Item], probs: np.ndarray, features: np.ndarray,
                      accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A film sent sideways or upside down is turned upright before anything reads it, and the
        gate looks again at the upright film (it was trained on upright films only). Costs one extra
        gate pass, for turned pictures only. A turn on trial (the head less sure) stands only when
        the head calls the turned-back picture upright; else the picture is read as sent."""
        clock = time.perf_counter()
        head = self.gate.orientation
        sure, trial = head.decide(features, accepted)
        turns = [a or b for a, b in zip(sure, trial, strict=True)]
        turned = [i for i, turn in enumerate(turns) if turn]
        for i in turned:
            items[i].image = np.ascontiguousarray(np.rot90(items[i].image, -turns[i] // 90))
            items[i].inputs.clear()
        if turned:
            again, maps = self._infer(self.gate, [items[i] for i in turned], "gate_upright")
            # A turn on trial stands only when the head calls the turned-back picture upright.
            stands = [not trial[i] or upright for i, upright in zip(turned, head.upright(maps), strict=True)]
            probs, features = probs.copy(), features.copy()
            for row, i in enumerate(turned):
                if stands[row]:
                    probs[i], features[i] = again[row], maps[row]
                    items[i].result.turned = turns[i]
                else:  # read as sent
                    items[i].image = np.ascontiguousarray(np.rot90(items[i].image, turns[i] // 90))
                    items[i].inputs.clear()
        # Left as sent (no turn, or a turn on trial that failed) though the head is unsure: search.
        searched = head.unsure(features, [item.result.turned for item in items])
        if searched:
            probs, features = self._search_upright(items, searched, probs, features)
        for item in items:
            item.result.timings_ms["orientation"] = _ms(clock)
        return probs, features

    def _search_upright(self, items: list[_Item], searched: list[int], probs: np.ndarray,
                        features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A picture the head is unsure of and would not turn: its three turned-back copies go through
        the gate in one pass, and the head's views of all four choose the turn (``best_turn``); else
        the picture is read as sent."""
        head, turns = self.gate.orientation, (90, 180, 270)
        copies = [self.gate.prepare(np.rot90(items[i].image, -turn // 90)) for i in searched for turn in turns]
        clock = time.perf_counter()
        logits, maps = self.gate.runner(np.stack(copies))
        elapsed = _ms(clock)
        again = self.gate.probabilities(logits)
        best = head.best_turn(features[searched], maps.reshape(len(searched), len(turns), *maps.shape[1:]))
        probs, features = probs.copy(), features.copy()
        for row, i in enumerate(searched):
            items[i].result.timings_ms["gate_search"] = elapsed
            if best[row]:
                copy = row * len(turns) + turns.index(best[row])
                items[i].image = np.ascontiguousarray(np.rot90(items[i].image, -best[row] // 90))
                items[i].inputs = {self.gate.input_key: copies[copy]}
                probs[i], features[i] = again[copy], maps[copy]
                items[i].result.turned = best[row]
        return probs, features

    def _body_part(self, items: list[_Item]) -> None:
        """Name the part only when the film looks like a known part and the model is sure enough.

        With an open-set check in the card: far from every known part → ``body_part_unknown`` (a photo,
        or a picture the photo step straightened, is judged by the card's photo threshold and floors,
        when it has them: ``OpenSetSpec.photo_view``); a part
        with its own stricter floor (chest: only a confident chest reaches the chest model) below
        it → ``body_part_uncertain``.
        """
        model = self.body_part
        card = model.card
        probs, features = self._infer(model, items, "body_part")
        novelty = model.novelty.scores(features) if model.novelty is not None else [None] * len(items)
        for item, row, distance in zip(items, probs, novelty, strict=True):
            photo = OpenSetSpec.photo_view(item.result.photographed, item.result.rectified)
            floors = card.open_set.floors_for(photo) if card.open_set else {}
            top = int(row.argmax())
            label = card.labels[top]
            item.result.body_part_probability = float(row[top])
            if distance is not None:
                item.result.body_part_novelty = round(float(distance), 3)
            if distance is not None and card.open_set.is_unknown(float(distance), float(row[top]), photo):
                item.result.outcome = "body_part_unknown"
            elif row[top] < max(card.min_confidence or 0.0, floors.get(label, 0.0)):
                item.result.outcome = "body_part_uncertain"
            else:
                item.result.body_part = label

    def _abnormality(self, model: LoadedModel, items: list[_Item], part: str, make_overlay: bool,
                     draw: list[str] | None = None) -> None:
        card = model.card
        block3 = make_overlay and self.heatmap == "cam" and model.baseline is not None and model.baseline.needs_block3
        probs, features, *maps = self._infer(model, items, part, block3)
        block3_maps = maps[0] if maps else [None] * len(items)
        point = verdict_point(card)  # the card's, the same for every film
        for item, row, feature_map, block3_map in zip(items, probs, features, block3_maps, strict=True):
            result = item.result
            # Calibrated probabilities, flags of the chosen mode, the verdict (diagnosis.operating).
            result.findings, result.abnormal_probability, result.verdict = assess(card, row, result.mode)
            result.verdict_point = dict(point)
            if not make_overlay:
                continue
            self._overlays(model, item, feature_map, draw, block3_map)

    def _overlays(self, model: LoadedModel, item: _Item, feature_map: np.ndarray,
                  draw: list[str] | None = None, block3_map: np.ndarray | None = None) -> None:
        """One overlay per drawn finding: what the reply flags (at most three), else the top finding
        among those the reply speaks about (screening: the labels the model is reliable at), drawn
        without red: nothing was flagged, so no area may look like a finding's evidence.
        ``draw`` (measuring): exactly these labels, red included, whatever was flagged."""
        result = item.result
        clock = time.perf_counter()
        if draw is not None:
            unknown = set(draw) - set(model.card.labels)
            if unknown:
                raise ValueError(f"cannot draw {sorted(unknown)}: not labels of {model.card.name!r}")
            drawn, red = [next(f for f in result.findings if f.label == label) for label in draw], True
        else:
            drawn, red = result.positive_findings[:MAX_HEATMAP_PANELS], True
            if not drawn:  # findings are sorted by probability: the first is the top one
                reliable = [f for f in result.findings if f.eligible] if result.mode == "screening" else []
                drawn, red = (reliable or result.findings)[:1], False
        result.heatmap_labels = [f.label for f in drawn]
        if block3_map is not None:  # the card's 8 × 8 block-3 map; its peak is found before clipping
            indices = [model.card.labels.index(f.label) for f in drawn]
            unclipped = model.baseline.block3_evidence(model.network, block3_map, indices, clip=False)
            maps = [np.clip(m, -1.0, 1.0).astype(np.float32) for m in unclipped]
        else:
            maps = unclipped = [self._heatmap(model, item, feature_map, f.label) for f in drawn]
        if not red and model.baseline is not None:
            maps, unclipped = [without_red(m) for m in maps], [without_red(m) for m in unclipped]
        result.peaks = [self._peak(model, item, m) for m in unclipped]
        result.timings_ms["heatmap"] = _ms(clock)
        clock = time.perf_counter()
        jpegs = render_overlays(item.image, maps)  # over the straightened film, if any
        item.overlays = list(zip(result.heatmap_labels, jpegs, strict=True))
        result.timings_ms["overlay"] = _ms(clock)

    def model_probabilities(self, part: str, datas: list[bytes]) -> np.ndarray:
        """Raw outputs (sigmoid/softmax of the logits, before any calibration) of the abnormality
        model for ``part`` on images, run exactly as ``run_batch`` runs it (intake, photo step, the
        card's preprocessing, the same runner with its mirror averaging), without gate and body part:
        for fitting operating points on labelled films. An undecodable image gives a row of NaN."""
        return self.model_outputs(part, datas)[0]

    def model_outputs(self, part: str, datas: list[bytes]) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """``model_probabilities`` and each image's post-ReLU feature map (None where undecodable):
        for fitting the heatmaps' normal baseline (``python -m training heatmap-baseline``)."""
        probs, maps, _ = self.model_maps(part, datas)
        return probs, maps

    def model_maps(self, part: str, datas: list[bytes],
                   block3: bool = False) -> tuple[np.ndarray, list[np.ndarray | None], list[np.ndarray | None]]:
        """``model_outputs`` plus each image's block-3 map when ``block3`` (else Nones)."""
        model = self.abnormality[part]
        items = [_Item(DiagnosisResult(outcome="analysed")) for _ in datas]
        for item, data in zip(items, datas, strict=True):
            self._read(item, data)
        out = np.full((len(items), len(model.card.outputs)), np.nan)
        maps: list[np.ndarray | None] = [None] * len(items)
        block3_maps: list[np.ndarray | None] = [None] * len(items)
        ready = [i for i, item in enumerate(items) if item.image is not None]
        if ready:
            probs, features, *more = self._infer(model, [items[i] for i in ready], part, block3)
            out[ready] = probs
            for n, i in enumerate(ready):
                maps[i] = features[n]
                block3_maps[i] = more[0][n] if more else None
        return out, maps, block3_maps

    def _heatmap(self, model: LoadedModel, item: _Item, feature_map: np.ndarray, label: str) -> np.ndarray:
        index = model.card.labels.index(label)
        if self.heatmap == "gradcam":  # the reference path: pytorch-grad-cam (post-ReLU, red only, may be blank)
            tensor = torch.from_numpy(item.inputs[model.input_key])[None]
            return grad_cam(model.network, tensor.to(next(model.network.parameters()).device), index)
        weights = model.network.classifier.weight[index].detach().float().cpu().numpy()
        if model.baseline is not None:  # relative to normal films: see diagnosis.heatmap.relative_evidence
            return model.baseline.evidence(index, weights, feature_map)
        return class_evidence(weights, feature_map)  # older cards: signed, scaled per film

    def _peak(self, model: LoadedModel, item: _Item, heatmap: np.ndarray) -> list[int] | None:
        """The map's hottest red point in the pixels of the image as sent (None: no red)."""
        size = model.card.input.size  # the map covers the model's (squashed) input
        point = hottest_red_point(heatmap, size, size)
        if point is None:
            return None
        height, width = item.image.shape[:2]
        upright = (point[0] * width / size, point[1] * height / size)
        return to_input_pixels(upright, (height, width), item.result.turned, item.corners, item.sent_shape)


def to_input_pixels(point: tuple[float, float], shape: tuple[int, int], turned: int,
                    corners: np.ndarray | None, sent_shape: tuple[int, int] | None) -> list[int]:
    """A point (x, y in continuous pixel coordinates: 0…width, pixel centres at +0.5) of the image
    the models read (``shape``: its height, width), mapped back to the pixel [column, row] of the
    image as sent: first the upright turn is undone (``turned``: degrees counter-clockwise the
    picture arrived turned, undone by ``np.rot90(·, -turned // 90)``), then the photo step's crop and
    straightening (``corners``: the film's corners TL, TR, BR, BL in the input's pixels)."""
    x, y = point
    height, width = shape
    if turned == 90:
        x, y = y, width - x
    elif turned == 180:
        x, y = width - x, height - y
    elif turned == 270:
        x, y = height - y, x
    if corners is not None:  # the straightened film → the photo (inverse of photo._straighten's warp)
        rows, columns = (height, width) if turned in (0, 180) else (width, height)
        target = np.float32([[0, 0], [columns - 1, 0], [columns - 1, rows - 1], [0, rows - 1]])
        matrix = cv2.getPerspectiveTransform(target, corners.astype(np.float32))
        mapped = cv2.perspectiveTransform(np.float32([[[x - 0.5, y - 0.5]]]), matrix)[0, 0]
        x, y = float(mapped[0]) + 0.5, float(mapped[1]) + 0.5
    limit_y, limit_x = sent_shape if sent_shape is not None else (height, width)
    return [int(min(max(np.floor(x), 0), limit_x - 1)), int(min(max(np.floor(y), 0), limit_y - 1))]


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)
