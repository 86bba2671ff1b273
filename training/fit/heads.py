"""Linear heads fitted on the frozen pooled features of a trained chest network.

A DenseNet's outputs are one linear layer over its 1024 pooled features, and mirror averaging
averages logits, which for a linear layer equals the layer applied to the averaged features. So
new outputs (the ``abnormal`` head) or refitted findings can be learnt from features extracted once
(forward passes only: minutes on a CPU instead of hours of fine-tuning), and the result is an
ordinary network: the same backbone with more rows in its classifier.

    python -m training heads --model models/chest --manifest M --manifest M_EXTRA --out runs/chest_heads

writes a run folder (``best.safetensors`` + ``state.json``) that ``python -m training export`` ships.
Features are cached under ``--cache`` (by weights hash), never in the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from diagnosis.network import load_model

from ..data.datasets import CHEST_LABELS, NIH_SOURCES, Record, load_sources
from ..data.images import RecordDataset
from ..data.tasks import Task
from ..measure.metrics import auc_report, masked_auc
from .train import describe_hardware

log = logging.getLogger(__name__)


# Where the network's trainable top may start: features[TOPS[name]:] trains on cached inputs.
TOPS = {"denseblock4": 10, "denseblock3": 8}
TOP_FROM = TOPS["denseblock4"]


class _Split(torch.nn.Module):
    """Input → (the top's input, e.g. the output of transition3; pooled post-ReLU features)."""

    def __init__(self, network, top_from: int = TOP_FROM):
        super().__init__()
        children = list(network.features.children())
        self.bottom, self.top, self.relu = torch.nn.Sequential(*children[:top_from]), torch.nn.Sequential(
            *children[top_from:]), network.relu

    def forward(self, x):
        middle = self.bottom(x)
        return middle, self.relu(self.top(middle)).mean((2, 3))


@dataclass
class Cached:
    middle: np.ndarray  # (N, 512, 4, 4) float16 at 128 px from denseblock4 on; (N, 256, 8, 8) from denseblock3
    pooled: np.ndarray  # (N, 1024) float32: pooled post-ReLU features (what the classifier sees)


class FeatureCache:
    """Forward passes of one network (ONNX Runtime: ~3× faster than eager torch on this CPU), stored
    per (image, mirrored) in chunk files under ``folder``; an interrupted extraction resumes."""

    def __init__(self, model_folder: Path, folder: Path, threads: int = 2, top: str = "denseblock4"):
        import onnxruntime as ort

        self.card, network = load_model(model_folder)
        self.folder = Path(folder) / (f"{self.card.name}-{self.card.weights.sha256[:16]}-{self.card.input.size}"
                                      + ("" if top == "denseblock4" else f"-{top}"))
        self.folder.mkdir(parents=True, exist_ok=True)
        onnx = self.folder / "split.onnx"
        if not onnx.is_file():
            size = self.card.input.size
            torch.onnx.export(_Split(network, TOPS[top]).eval(), (torch.zeros(1, 1, size, size),), str(onnx),
                              input_names=["input"], output_names=["middle", "pooled"], opset_version=17,
                              dynamo=False, dynamic_axes={"input": {0: "n"}, "middle": {0: "n"}, "pooled": {0: "n"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        self.index: dict[str, tuple[int, int]] = {}  # "path|mirrored" → (chunk, row)
        self.chunks: list[Cached] = []
        timing = self.folder / "seconds.json"
        self.seconds = json.loads(timing.read_text()) if timing.is_file() else 0.0  # all extraction so far
        for meta in sorted(self.folder.glob("chunk-*.json"), key=lambda p: int(p.stem.split("-")[1])):
            tensors = load_file(str(meta.with_suffix(".safetensors")))
            self._add(json.loads(meta.read_text()), Cached(tensors["middle"].numpy(), tensors["pooled"].numpy()))

    def _add(self, keys: list[str], cached: Cached) -> None:
        chunk = len(self.chunks)
        self.chunks.append(cached)
        self.index.update({key: (chunk, row) for row, key in enumerate(keys)})

    @staticmethod
    def key(record: Record, mirrored: bool, turn: int = 0) -> str:
        """``turn``: degrees counter-clockwise, after the mirror image (0 keeps the key of old caches)."""
        return f"{record.path}|{int(mirrored)}" + (f"|{turn}" if turn else "")

    def extract(self, jobs: list[tuple], chunk_size: int = 512) -> None:
        """``jobs``: (record, mirrored) or (record, mirrored, turn) passes not cached yet."""
        jobs = [job for job in dict.fromkeys(jobs) if self.key(*job) not in self.index]
        if not jobs:
            return
        log.info("extracting %d forward passes (%d cached)", len(jobs), len(self.index))
        task = Task("chest", list(CHEST_LABELS), "sigmoid", ["abnormal"])
        spec = self.card.input
        dataset = RecordDataset([job[0] for job in jobs], task, spec.size, spec.mean, spec.std, cache=_Forget(),
                                cache_side=None)
        bar = tqdm(total=len(jobs), desc="features", mininterval=30)
        for begin in range(0, len(jobs), chunk_size):
            clock = time.time()
            part = range(begin, min(begin + chunk_size, len(jobs)))
            middles, pooled = [], []
            for batch in (part[i:i + 64] for i in range(0, len(part), 64)):
                images = np.stack([dataset[i][0].numpy() for i in batch])
                mirrored = np.asarray([jobs[i][1] for i in batch])
                images[mirrored] = images[mirrored][..., ::-1]
                for row, i in enumerate(batch):  # a square input: turning it turns the squashed picture
                    if len(jobs[i]) > 2 and jobs[i][2]:
                        images[row] = np.rot90(images[row], jobs[i][2] // 90, axes=(-2, -1))
                middle, pool = self.session.run(["middle", "pooled"], {"input": np.ascontiguousarray(images)})
                middles.append(middle.astype(np.float16))
                pooled.append(pool)
                bar.update(len(batch))
            cached = Cached(np.concatenate(middles), np.concatenate(pooled))
            keys = [self.key(*jobs[i]) for i in part]
            name = self.folder / f"chunk-{len(self.chunks)}"
            save_file({"middle": torch.from_numpy(cached.middle), "pooled": torch.from_numpy(cached.pooled)},
                      str(name) + ".safetensors")
            (name.with_suffix(".json")).write_text(json.dumps(keys))  # written last: marks the chunk whole
            self._add(keys, cached)
            self.seconds += time.time() - clock
            (self.folder / "seconds.json").write_text(json.dumps(self.seconds))
        bar.close()

    def get(self, records: list[Record], mirrored: bool, what: str = "pooled") -> np.ndarray:
        return self.rows([(r, mirrored) for r in records], what)

    def rows(self, passes: list[tuple], what: str = "pooled") -> np.ndarray:
        """The cached ``what`` of each (record, mirrored[, turn]) pass, stacked in order."""
        where = [self.index[self.key(*p)] for p in passes]
        return np.stack([getattr(self.chunks[c], what)[row] for c, row in where])

    def has(self, record: Record, mirrored: bool, turn: int = 0) -> bool:
        return self.key(record, mirrored, turn) in self.index


class _Forget(dict):
    """A dataset cache that keeps nothing: each image is decoded once here, and 20,000 decoded
    films would not fit in memory."""

    def __setitem__(self, key, value) -> None:
        pass


def fit_logistic(features: np.ndarray, target: np.ndarray, weights: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """L2 logistic regression on standardised features, folded back into one (w, b) on raw features."""
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=3000)
    model.fit((features - mean) / scale, target, sample_weight=weights)
    w = model.coef_[0] / scale
    return w.astype(np.float32), float(model.intercept_[0] - (w * mean).sum())


def source_weights(records: list[Record], shares: dict[str, float]) -> np.ndarray:
    """Each source gets ``shares[source]`` of the total weight (0 or absent drops it), split over its films."""
    counts = Counter(r.source for r in records)
    total = sum(shares.get(s, 0.0) for s in counts)
    return np.asarray([shares.get(r.source, 0.0) / total / counts[r.source] * len(records) for r in records])


class Split:
    """Records of one split with their pooled features (val/test: mirror-averaged) and targets."""

    def __init__(self, cache: FeatureCache, records: list[Record], task: Task, mirrored: bool):
        self.records = [r for r in records if cache.has(r, False)]
        self.features = cache.get(self.records, False)
        if mirrored:  # mirror-averaged where the mirror pass exists (NIH val films)
            both = np.asarray([cache.has(r, True) for r in self.records])
            self.features[both] = (self.features[both] + cache.get(
                [r for r, b in zip(self.records, both, strict=True) if b], True)) / 2
        self.targets = np.stack([task.target(r) for r in self.records])
        self.sources = np.asarray([r.source for r in self.records])
        self.nih = np.isin(self.sources, NIH_SOURCES)


def logits_of(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return features @ weight.T + bias


def fit_abnormal(train: Split, shares: dict[str, float], c: float) -> tuple[np.ndarray, float]:
    column = train.targets[:, -1]
    chosen = ~np.isnan(column) & np.isin(train.sources, [s for s, v in shares.items() if v > 0])
    records = [r for r, keep in zip(train.records, chosen, strict=True) if keep]
    return fit_logistic(train.features[chosen], column[chosen], source_weights(records, shares), c)


def refit_findings(train: Split, shares: dict[str, float], c: float) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per finding on the films where it is known."""
    weights, biases = [], []
    for index in range(len(CHEST_LABELS)):
        column = train.targets[:, index]
        chosen = ~np.isnan(column) & np.isin(train.sources, [s for s, v in shares.items() if v > 0])
        records = [r for r, keep in zip(train.records, chosen, strict=True) if keep]
        w, b = fit_logistic(train.features[chosen], column[chosen], source_weights(records, shares), c)
        weights.append(w)
        biases.append(b)
    return np.stack(weights), np.asarray(biases, dtype=np.float32)


def describe(split: Split, logits: np.ndarray) -> dict:
    """Val figures on NIH films (mean AUC over the 14, abnormal AUC) and abnormal AUC on all sources."""
    nih = split.nih
    findings = auc_report(CHEST_LABELS, split.targets[nih, :14], logits[nih, :14])
    result = {"mean_auc": findings["mean_auc"], "auc": findings["auc"]}
    if logits.shape[1] > len(CHEST_LABELS):
        result["abnormal_auc"] = masked_auc(split.targets[nih, -1], logits[nih, -1])
        result["abnormal_auc_all_sources"] = masked_auc(split.targets[:, -1], logits[:, -1])
    return result


def experiments(train: Split, val: Split, weight: np.ndarray, bias: np.ndarray) -> list[dict]:
    """The val comparisons behind the recipe: which sources and regularisation the abnormal head
    uses, whether refitting the 14 heads on the extra films beats the trained ones, and a score
    derived from the 14 outputs as the baseline an abnormal head must beat."""
    rows = []
    shipped = logits_of(val.features, weight, bias)
    probs = 1 / (1 + np.exp(-shipped))
    rows.append({"what": "shipped 14 heads", **describe(val, shipped)})
    noisy_or = 1 - np.prod(1 - probs, axis=1)
    rows.append({"what": "abnormal = 1 - prod(1 - p) of the 14 (baseline)",
                 "abnormal_auc": masked_auc(val.targets[val.nih, -1], noisy_or[val.nih]),
                 "abnormal_auc_all_sources": masked_auc(val.targets[:, -1], noisy_or)})
    mixes = {
        "nih": {"nih_cxr14": 1, "nih_extra": 1},
        "nih+rsna": {"nih_cxr14": 1, "nih_extra": 1, "rsna_normal": 0.5},
        "nih+rsna+covid": {"nih_cxr14": 1, "nih_extra": 1, "rsna_normal": 0.5, "covid_radiography": 0.5},
        "nih+rsna+covid+paed": {"nih_cxr14": 1, "nih_extra": 1, "rsna_normal": 0.5, "covid_radiography": 0.5,
                                "cxr_normal_paediatric": 0.25},
        "nih+covid small": {"nih_cxr14": 1, "nih_extra": 1, "covid_radiography": 0.15},
    }
    for name, shares in mixes.items():
        for c in (0.003, 0.03):
            w, b = fit_abnormal(train, shares, c)
            logits = np.concatenate([shipped, logits_of(val.features, w[None], np.asarray([b]))], axis=1)
            figures = describe(val, logits)
            rows.append({"what": f"abnormal head: {name}, C={c}", "shares": shares, "c": c,
                         "abnormal_auc": figures["abnormal_auc"],
                         "abnormal_auc_all_sources": figures["abnormal_auc_all_sources"]})
    for name, shares in (("nih", mixes["nih"]), ("nih+rsna", mixes["nih+rsna"])):
        for c in (0.01,):
            w, b = refit_findings(train, shares, c)
            rows.append({"what": f"14 heads refitted: {name}, C={c}", "shares": shares, "c": c,
                         **describe(val, logits_of(val.features, w, b))})
    return rows


def write_run(out: Path, model_folder: Path, weight: np.ndarray, bias: np.ndarray, meta: dict) -> None:
    """A run folder as ``train`` writes it: the model's own weights with the new classifier rows."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() for k, v in load_file(str(model_folder / "weights.safetensors")).items()}
    state["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    state["classifier.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    save_file(state, str(out / "best.safetensors"))
    (out / "state.json").write_text(json.dumps(meta, indent=1))


def extraction_plan(records: list[Record], train_limit: dict[str, int], other_val_limit: int,
                    mirror_train: bool = False) -> list[tuple[Record, bool]]:
    """What the fitting needs, most needed first: NIH val films and their mirror images (every
    choice is made on them), then train films up to a per-source limit (NIH first), then a sample of
    the other sources' val films (one pass each; they only check the abnormal head across sources);
    with ``mirror_train``, last, the mirror images of the NIH train films (augmentation for
    ``python -m training top``). Test films are left to ``python -m training evaluate``."""
    def rank(r: Record) -> tuple:
        return (r.split != "val" or r.source not in NIH_SOURCES, r.split != "train", r.source not in NIH_SOURCES,
                r.source, str(r.path))

    records = [r for r in records if r.split in ("train", "val")]

    jobs, taken = [], Counter()
    for record in sorted(records, key=rank):
        taken[record.source, record.split] += 1
        if record.split == "val" and record.source in NIH_SOURCES:
            jobs += [(record, False), (record, True)]
        elif taken[record.source, record.split] <= (
                other_val_limit if record.split == "val" else train_limit.get(record.source, 10**9)):
            jobs.append((record, False))
    if mirror_train:
        jobs += [(r, True) for r, mirrored in list(jobs)
                 if not mirrored and r.split == "train" and r.source in NIH_SOURCES]
    return jobs


def parse_shares(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in (item.split("=") for item in text.split(",") if item)}


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a network and its feature cache (shared with ``training.fit.top``)."""
    parser.add_argument("--model", type=Path, default=Path("models/chest"))
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "chest-features")
    parser.add_argument("--threads", type=int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training heads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(parser)
    parser.add_argument("--out", type=Path, help="run folder to write (else: only report val figures)")
    parser.add_argument("--abnormal-shares", default="nih_cxr14=1,nih_extra=1",
                        help="source=share for the abnormal head's training films (val-chosen)")
    parser.add_argument("--abnormal-c", type=float, default=0.01, help="inverse L2 strength (val-chosen)")
    parser.add_argument("--train-limit", type=parse_shares, default={},
                        help="source=N: at most N train films of a source get features (time on a CPU)")
    parser.add_argument("--other-val-limit", type=int, default=400,
                        help="val films per non-NIH source that get features")
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--mirror-train", action="store_true", help="also mirror passes of the NIH train films")
    parser.add_argument("--top", choices=list(TOPS), default="denseblock4",
                        help="cache the input of this block (python -m training top trains from it on)")
    parser.add_argument("--experiments", action="store_true", help="print the val comparisons behind the recipe")
    parser.add_argument("--experiments-json", type=Path)
    parser.add_argument("--refit-findings-c", type=float, help="refit the 14 finding heads too (val-chosen)")
    parser.add_argument("--refit-findings-shares", default="nih_cxr14=1,nih_extra=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = Task("chest", list(CHEST_LABELS), "sigmoid", ["abnormal"])
    records = [r for r in load_sources(args.manifest) if task.applies(r)]
    started = time.time()
    cache = FeatureCache(args.model, args.cache, threads=args.threads or 2, top=args.top)
    cache.extract(extraction_plan(records, args.train_limit, args.other_val_limit, args.mirror_train))
    log.info("features ready after %.0f s (%.0f s of extraction in all)", time.time() - started, cache.seconds)
    if args.extract_only:
        return 0

    card, network = load_model(args.model)
    weight = network.classifier.weight.detach().numpy()[: len(CHEST_LABELS)]
    bias = network.classifier.bias.detach().numpy()[: len(CHEST_LABELS)]
    train = Split(cache, [r for r in records if r.split == "train"], task, mirrored=False)
    val = Split(cache, [r for r in records if r.split == "val"], task, mirrored=True)
    log.info("train films with features: %s", dict(Counter(train.sources)))
    log.info("val films with features: %s", dict(Counter(val.sources)))
    if args.experiments:
        rows = experiments(train, val, weight, bias)
        for row in rows:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "auc"}))
        if args.experiments_json:
            args.experiments_json.write_text(json.dumps(rows, indent=1))
    if args.out is None:
        return 0
    started = time.time()
    shares = parse_shares(args.abnormal_shares)
    if args.refit_findings_c:
        weight, bias = refit_findings(train, parse_shares(args.refit_findings_shares), args.refit_findings_c)
    w, b = fit_abnormal(train, shares, args.abnormal_c)
    weight, bias = np.concatenate([weight, w[None]]), np.concatenate([bias, [b]]).astype(np.float32)
    figures = describe(val, logits_of(val.features, weight, bias))
    used = Counter(r.source for r in train.records if shares.get(r.source, 0) > 0)
    for entry in card.data_sources:  # what the backbone was trained on stays on the record
        used[entry["source"]] = max(used[entry["source"]], entry.get("train_images", 0))
    write_run(args.out, args.model, weight, bias, {
        "epoch": 0, "best": figures["mean_auc"], "smoothed": figures["mean_auc"],
        "history": [{"epoch": 1, "mean_auc": figures["mean_auc"], "abnormal_auc": figures["abnormal_auc"],
                     "abnormal_auc_all_sources": figures["abnormal_auc_all_sources"],
                     "seconds": round(time.time() - started, 1)}],
        "train_seconds": round(time.time() - started + cache.seconds),
        "initialisation": f"{args.model.name} of {card.version} (frozen backbone"
                          + (", 14 finding heads refitted" if args.refit_findings_c else ", its 14 finding heads")
                          + "); abnormal head: logistic regression on its pooled, mirror-averaged features",
        "task": {"name": "chest", "labels": list(CHEST_LABELS), "activation": "sigmoid", "extra_outputs": ["abnormal"]},
        "config": {"size": card.input.size, "mean": card.input.mean, "std": card.input.std,
                   "optimizer": "scikit-learn LogisticRegression (L-BFGS), L2 on standardised features",
                   "abnormal_c": args.abnormal_c, "group_shares": shares,
                   "refit_findings_c": args.refit_findings_c,
                   "recipe_of_the_backbone": card.training.get("recipe")},
        "train_records": sum(used.values()), "train_sources": dict(used),
        "data": "xray-pack " + " + ".join(Path(m).name for m in args.manifest)
                + f"; abnormal head on the train films of sources {shares} (weight shares), "
                  f"features of at most {args.train_limit or 'all'} train films per source",
        "hardware": f"2-core CPU ({describe_hardware(torch.device('cpu'))}); features by ONNX Runtime",
    })
    log.info("wrote %s: val %s", args.out, json.dumps({k: v for k, v in figures.items() if k != "auc"}))
    return 0
