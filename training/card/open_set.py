"""Open-set body part: say "a body part I cannot read yet" instead of naming a wrong part.

    python -m training open-set --model models/body_part --manifest ../shared/data/xray-pack/manifest.csv \\
        [--cache /tmp/open-set] [--keep 0.97] [--chest-keep 0.98] [--train-photos 300] [--val-photos 300] \\
        [--holdout-photos 5] [--photos 300] [--json OUT] [--dry-run]

1. Pooled 1024-d features and logits of the body-part model on every radiograph of a part the card
   knows (train: at most ``--max-train-per-part`` per part), seen as the service sees them
   (``training.features``).
2. Candidate scores, each "higher = less like a known part": 1 − max softmax, energy (−logsumexp of the
   logits), −max logit, and the Mahalanobis distance to the nearest part mean (one shared covariance,
   Ledoit–Wolf shrinkage; on raw or L2-normalised features), means and covariance fitted on train
   films and ``--train-photos`` synthetic phone photos of train films per part.
3. Every threshold keeps ``--keep`` of the known-part val films. Mahalanobis only: a second threshold
   for phone photos of films and pictures the service's photo step straightened
   (``OpenSetSpec.photo_view``; such photos lie further from the films): it keeps ``--keep`` of the
   straightened synthetic photos (seed 0) of
   at most ``--val-photos`` val films per known part. The Mahalanobis variant shipped is the one that
   names the fewest val films of parts the card does not know, and synthetic photos of them
   (``--holdout-photos`` per film), as a known part at its thresholds, then the widest margin between
   the threshold and the nearest such film (the hold-out: the pack's hip and wrist films, never
   fitted on; only their 6 val films and photos of them take part in this choice, all 33 are reported).
4. Chest floor: only a confident chest reaches the chest model; the floor keeps ``--chest-keep`` of
   the val chest films and val chest photos that pass the open-set check (never below ``min_confidence``).
5. ``--photos N``: body part = chest on synthetic photos of N val and N test chest films, before and
   after (val photos are the ones the threshold saw; test photos are new).

Writes ``open_set.safetensors`` (means, precision) beside the weights and the ``open_set`` entry of
the card (with its measured figures: val and test coverage cost, test accuracy before/after, and
wrong-part naming on the hold-out before/after).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from diagnosis.cards import AuxiliaryFile, OpenSetSpec, read_card, sha256_of, write_card
from diagnosis.openset import mahalanobis

from ..data.datasets import Record, by_file_name
from ..features import FeatureStore, drop_refused, service_read
from ..measure.reports import emit_report

log = logging.getLogger(__name__)
ARRAYS_FILE = "open_set.safetensors"


def choose_records(records: list[Record], labels: list[str], max_train_per_part: int) -> list[Record]:
    """Known-part radiographs (train capped per part, chosen by a hash of the file name) + every film
    of a part the card does not know (the hold-out, all splits)."""
    xrays = [r for r in records if r.is_xray and r.body_part]
    train: dict[str, list[Record]] = defaultdict(list)
    for record in sorted((r for r in xrays if r.split == "train" and r.body_part in labels), key=by_file_name):
        train[record.body_part].append(record)
    chosen = [r for part in labels for r in train[part][:max_train_per_part]]
    return chosen + [r for r in xrays if r.split != "train" or r.body_part not in labels]


def _photo_set(groups: list[tuple[list[Record], tuple]], labels: list[str], fitted: dict) -> dict:
    """Synthetic photo rows (from ``synthetic_photo_features``) the intake reads: probabilities, both
    Mahalanobis scores, straightened or not, true part and split."""
    logits = np.concatenate([g[1][0] for g in groups])
    pooled = np.concatenate([g[1][1] for g in groups])
    rect = np.concatenate([g[1][2] for g in groups])
    films = [r for g in groups for r in g[0]]
    ok = np.isfinite(pooled[:, 0])
    pooled = pooled[ok]
    return {"probs": softmax(logits[ok, : len(labels)].astype(np.float64), axis=1), "rect": rect[ok],
            "score": {n: mahalanobis(pooled, *fitted[n], normalise=n).min(axis=1) for n in (False, True)},
            "part": np.array([r.body_part for r, k in zip(films, ok, strict=True) if k]),
            "split": np.array([r.split for r, k in zip(films, ok, strict=True) if k])}


def fit_mahalanobis(pooled: np.ndarray, parts: np.ndarray, count: int,
                    normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    x = pooled.astype(np.float64)
    if normalise:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    means = np.stack([x[parts == c].mean(axis=0) for c in range(count)])
    precision = LedoitWolf().fit(x - means[parts]).precision_
    return means, precision


def outcomes(probs: np.ndarray, score: np.ndarray | None, threshold, labels: list[str],
             min_confidence: float, floors) -> list[str]:
    """What the pipeline says per film: a part's name, "unknown" or "uncertain" (as diagnosis.pipeline).
    ``threshold``: one number, or one per row (photos straightened by the photo step get the card's
    ``photo_threshold``); ``floors``: one dict of per-part floors, or one per row (photo floors)."""
    said = []
    per_row = floors if isinstance(floors, np.ndarray) else [floors] * len(probs)
    limits = np.broadcast_to(np.asarray(threshold if threshold is not None else np.inf, dtype=np.float64),
                             (len(probs),))
    for i, row in enumerate(probs):
        top = int(row.argmax())
        if score is not None and score[i] > limits[i]:
            said.append("unknown")
        elif row[top] < max(min_confidence, per_row[i].get(labels[top], 0.0)):
            said.append("uncertain")
        else:
            said.append(labels[top])
    return said


def summary(said: list[str], truth: list[str], known: bool) -> dict:
    n = len(said)
    named = [s for s in said if s not in ("unknown", "uncertain")]
    entry = {"n": n, "unknown": said.count("unknown"), "uncertain": said.count("uncertain"), "named": len(named)}
    if known:
        correct = sum(s == t for s, t in zip(said, truth, strict=True))
        entry.update(correct=correct, accuracy=round(correct / max(n, 1), 4),
                     accuracy_when_named=round(correct / max(len(named), 1), 4),
                     not_named_rate=round((n - len(named)) / max(n, 1), 4))
        per_part = defaultdict(Counter)
        for s, t in zip(said, truth, strict=True):
            per_part[t]["n"] += 1
            per_part[t]["not_named"] += s in ("unknown", "uncertain")
        entry["not_named_by_part"] = {p: dict(c) for p, c in sorted(per_part.items())}
    else:
        entry.update(wrong_part_rate=round(len(named) / max(n, 1), 4), named_chest=named.count("chest"),
                     named_as=dict(Counter(named)))
    return entry


# Quantiles of the val known-part scores tried: steps of 0.25 % above 97 % (the coarser 1 % steps jumped
# from 2,686 to 3,661 on the pack's val films, past the nearest hold-out film at 3,168; issue #21).
KEEP_GRID = (0.9, 0.95, *(round(0.97 + 0.0025 * i, 4) for i in range(12)), 0.998, 1.0)
BEYOND_GRID = (1.1, 1.25, 1.5, 2.0)  # and multiples of the farthest one
CHEST_KEEP_GRID = (0.98, 0.99, 0.995, 1.0)  # shares of the passing val chest films the chest floor keeps


def _grid(scores: np.ndarray) -> list[float]:
    if not len(scores):
        return []
    return sorted({round(float(np.quantile(scores, q)), 4) for q in KEEP_GRID}
                  | {round(float(scores.max() * f), 4) for f in BEYOND_GRID})


def choose_on_curve(known: dict[str, tuple], holdout: tuple, photos_known: tuple | None,
                    photos_holdout: tuple | None, labels: list[str], min_confidence: float,
                    max_wrong: float) -> dict:
    """The unknown-part thresholds and chest floors, chosen on val from a curve.

    ``known``: name → (probs, score, rectified, true part) of val films and real val photos;
    ``photos_known``: the same for synthetic val photos (None: no photo threshold); ``holdout`` and
    ``photos_holdout``: (probs, score, rectified) of films and photos of parts the model does not know
    (never fitted on). Kept = the mean over every (set, part) of the share named right; the point kept
    is the one with the most kept among those naming at most ``max_wrong`` of the hold-out as a known
    part and none as chest; ties go to the stricter thresholds (more room for parts never seen)."""
    sets = dict(known)
    if photos_known is not None:
        sets["val_synthetic_photos"] = photos_known
    hold = [holdout] + ([photos_holdout] if photos_holdout is not None else [])
    chest = labels.index("chest") if "chest" in labels else None
    films = np.concatenate([s[1][~np.asarray(s[2], bool)] for s in known.values()])
    film_grid = _grid(films if len(films) else np.concatenate([s[1] for s in known.values()]))
    # Photo thresholds tried: from the distances of the val photos judged by it (synthetic photos the
    # photo step straightened, and real photos: colour, so always photos).
    real_photos = [s[1][np.asarray(s[2], bool)] for name, s in known.items() if name.endswith("photos")]
    photo_scores = (np.concatenate([photos_known[1][photos_known[2]], *real_photos])
                    if photos_known is not None else np.zeros(0))
    photo_grid = _grid(photo_scores) or [None]

    def chest_floor(threshold: float, photo_threshold: float | None, keep: float, photo: bool) -> float:
        rows = [s for s in ([photos_known] if photo else list(known.values())) if s is not None]
        passing = [s[0][(np.asarray(s[2], bool) == photo) & (s[3] == "chest")
                        & (s[1] <= (photo_threshold if photo else threshold))] for s in rows]
        chest_probs = np.concatenate([p[:, chest] for p in passing]) if passing else np.zeros(0)
        if not len(chest_probs):
            return round(float(min_confidence), 4)
        return round(float(max(min_confidence, np.quantile(chest_probs, 1 - keep))), 4)

    def said(entry: tuple, threshold: float, photo_threshold: float | None, floors: dict, photo_floors: dict):
        rect = np.asarray(entry[2], bool)
        limits = np.where(rect, photo_threshold if photo_threshold is not None else threshold, threshold)
        per_row = np.array([photo_floors if r else floors for r in rect]) if len(rect) else np.array([])
        return outcomes(entry[0], entry[1], limits, labels, min_confidence, per_row)

    curve = []
    best = None
    for threshold in film_grid:
        for photo_threshold in photo_grid:
            if photo_threshold is not None and photo_threshold < threshold:
                continue
            for keep in CHEST_KEEP_GRID if chest is not None else (1.0,):
                floors = {"chest": chest_floor(threshold, photo_threshold, keep, False)} if chest is not None else {}
                photo_floors = ({"chest": chest_floor(threshold, photo_threshold, keep, True)}
                                if chest is not None and photo_threshold is not None else floors)
                shares, per_set = [], {}
                for name, entry in sets.items():
                    words = said(entry, threshold, photo_threshold, floors, photo_floors)
                    right = np.asarray(words) == entry[3]
                    per_set[name] = round(float(right.mean()), 4) if len(right) else None
                    shares += [float(right[entry[3] == part].mean()) for part in labels if (entry[3] == part).any()]
                words = [w for entry in hold for w in said(entry, threshold, photo_threshold, floors, photo_floors)]
                named = [w for w in words if w not in ("unknown", "uncertain")]
                point = {"threshold": threshold, "photo_threshold": photo_threshold, "chest_keep": keep,
                         "floors": floors, "photo_floors": photo_floors,
                         "kept": round(float(np.mean(shares)), 4) if shares else 0.0, "kept_by_set": per_set,
                         "holdout_n": len(words), "holdout_named": len(named),
                         "holdout_wrong_part_rate": round(len(named) / max(len(words), 1), 4),
                         "holdout_called_chest": named.count("chest")}
                point["allowed"] = point["holdout_called_chest"] == 0 and point["holdout_wrong_part_rate"] <= max_wrong
                curve.append(point)
                if point["allowed"] and (best is None or point["kept"] > best["kept"]):
                    best = point
    if best is None:  # nothing meets the bound: the strictest point
        best = curve[0]
    frontier = [p for p in curve if p["allowed"] and not any(
        q["allowed"] and q["kept"] > p["kept"] and q["holdout_wrong_part_rate"] <= p["holdout_wrong_part_rate"]
        for q in curve)]
    compact = sorted({(p["kept"], p["holdout_wrong_part_rate"]): p for p in frontier}.values(), key=lambda p: p["kept"])
    return {**{k: v for k, v in best.items() if k != "allowed"}, "max_wrong": max_wrong, "points_tried": len(curve),
            "frontier": [{k: p[k] for k in ("threshold", "photo_threshold", "chest_keep", "kept",
                                             "holdout_wrong_part_rate")} for p in compact]}


def run(model: Path, records: list[Record], cache: Path, keep: float, chest_keep: float, max_train_per_part: int,
        write: bool = True, train_photos: int = 0, seed: int = 1, val_photos: int = 0,
        holdout_photos: int = 5, photo_keep: float = 0.95, curve: bool = True, max_wrong: float = 0.05) -> dict:
    card = read_card(model)
    labels = card.labels
    chosen = choose_records(records, labels, max_train_per_part)
    store = FeatureStore(model, cache)
    logits, pooled = store.outputs([r.path for r in chosen])
    chosen, (logits, pooled), refused = drop_refused(chosen, logits, pooled)  # never reach the models
    logits = logits[:, : len(labels)].astype(np.float64)
    probs = softmax(logits, axis=1)
    parts = np.array([r.body_part for r in chosen])
    splits = np.array([r.split for r in chosen])
    known = np.isin(parts, labels)
    index = np.array([labels.index(p) if p in labels else -1 for p in parts])
    train, val, test = known & (splits == "train"), known & (splits == "val"), known & (splits == "test")
    unknown = ~known
    val_unknown = unknown & (splits == "val")
    log.info("train %d, val %d, test %d known-part films; %d hold-out films (%s)", train.sum(), val.sum(),
             test.sum(), unknown.sum(), dict(Counter(parts[unknown])))

    fit_pooled, fit_index = pooled[train], index[train]
    if train_photos:
        # Photos of films are what a phone sends: fit on synthetic photos of train films as well (the
        # body-part network was trained on such photos too), at most ``train_photos`` per part.
        sources = [r for part in labels for r in [c for c in chosen if c.split == "train" and c.body_part == part
                                                   and c.kind == "radiograph"][:train_photos]]
        _, photo_pooled, _ = synthetic_photo_features(store, sources, seed, flags=False)
        ok = np.isfinite(photo_pooled[:, 0])
        fit_pooled = np.concatenate([fit_pooled, photo_pooled[ok]])
        fit_index = np.concatenate([fit_index, np.array([labels.index(r.body_part) for r in sources])[ok]])
        log.info("fit on %d train films and %d synthetic photos of train films", int(train.sum()), int(ok.sum()))
    fitted = {normalise: fit_mahalanobis(fit_pooled, fit_index, len(labels), normalise)
              for normalise in (False, True)}
    candidates = {
        "max_softmax": 1 - probs.max(axis=1),
        "energy": -logsumexp(logits, axis=1),
        "max_logit": -logits.max(axis=1),
        "mahalanobis": mahalanobis(pooled, *fitted[False], normalise=False).min(axis=1),
        "mahalanobis_normalised": mahalanobis(pooled, *fitted[True], normalise=True).min(axis=1),
    }
    min_confidence = card.min_confidence or 0.0
    truth = list(parts)
    comparison = {}
    for name, score in candidates.items():
        threshold = float(np.quantile(score[val], keep))
        said = outcomes(probs, score, threshold, labels, min_confidence, {})
        comparison[name] = {
            "threshold": threshold,
            "val_auroc_vs_val_holdout": round(float(roc_auc_score(
                np.r_[np.zeros(val.sum()), np.ones(val_unknown.sum())], np.r_[score[val], score[val_unknown]])), 4)
            if val_unknown.any() else None,
            "auroc_val_vs_all_holdout": round(float(roc_auc_score(
                np.r_[np.zeros(val.sum()), np.ones(unknown.sum())], np.r_[score[val], score[unknown]])), 4),
            "holdout_wrong_part_rate": summary([said[i] for i in np.flatnonzero(unknown)], [],
                                               False)["wrong_part_rate"],
            "test_not_named_rate": summary([said[i] for i in np.flatnonzero(test)],
                                           [truth[i] for i in np.flatnonzero(test)], True)["not_named_rate"],
        }
    # Photos. A phone photo of a film that the service's photo step straightened
    # (``result.rectified``) lies further from the train films in feature space than a digital film,
    # so it gets its own threshold: the one keeping ``keep`` of the straightened val synthetic photos
    # of known-part val films (seed 0, at most ``val_photos`` per part). Digital films keep the film
    # threshold. Hold-out: ``holdout_photos`` synthetic photos (seeds 0, 1, ...) of every hip and
    # wrist film, never fitted on; only the photos of the val hold-out films take part in choices.
    film_rect = np.zeros(len(chosen), bool)
    rows = np.flatnonzero(~train)
    film_rect[rows] = film_rectified(store, [chosen[i] for i in rows])
    photos: dict[str, dict] = {}
    if val_photos:
        groups = []
        for part in labels:
            films = sorted((r for r in records if r.split == "val" and r.body_part == part and r.kind == "radiograph"
                            and not r.synthetic), key=by_file_name)[:val_photos]
            if films:
                groups.append((films, synthetic_photo_features(store, films, 0)))
        photos["val_known"] = _photo_set(groups, labels, fitted)
        holdout = [chosen[i] for i in np.flatnonzero(unknown)]
        photos["holdout"] = _photo_set([(holdout, synthetic_photo_features(store, holdout, s))
                                        for s in range(holdout_photos)], labels, fitted)
        log.info("val photos: %d (%d straightened); hold-out photos: %d (%d straightened)",
                 len(photos["val_known"]["rect"]), photos["val_known"]["rect"].sum(),
                 len(photos["holdout"]["rect"]), photos["holdout"]["rect"].sum())

    def film_limits(entry: dict) -> np.ndarray:
        return np.where(film_rect, entry.get("photo_threshold", entry["threshold"]), entry["threshold"])

    def photo_said(entry: dict, which: str, normalise: bool, floors: dict[str, float],
                   photo_floors: dict[str, float] | None = None) -> list[str]:
        p = photos[which]
        limits = np.where(p["rect"], entry.get("photo_threshold", entry["threshold"]), entry["threshold"])
        per_row = np.array([photo_floors if r and photo_floors is not None else floors for r in p["rect"]])
        return outcomes(p["probs"], p["score"][normalise], limits, labels, min_confidence, per_row)

    for name, normalise in (("mahalanobis", False), ("mahalanobis_normalised", True)):
        entry = comparison[name]
        if photos:
            v = photos["val_known"]
            straight = v["score"][normalise][v["rect"]]
            entry["photo_threshold"] = max(entry["threshold"], float(np.quantile(straight, photo_keep)))
            said = photo_said(entry, "holdout", normalise, {})
            h_val = photos["holdout"]["split"] == "val"
            entry["holdout_photos_wrong_part_rate"] = summary(said, [], False)["wrong_part_rate"]
            entry["val_holdout_photos_wrong_part_rate"] = summary(
                [s for s, ok in zip(said, h_val, strict=True) if ok], [], False)["wrong_part_rate"]
        said = outcomes(probs, candidates[name], film_limits(entry), labels, min_confidence, {})
        entry["holdout_wrong_part_rate"] = summary([said[i] for i in np.flatnonzero(unknown)], [],
                                                   False)["wrong_part_rate"]
        entry["test_not_named_rate"] = summary([said[i] for i in np.flatnonzero(test)],
                                               [truth[i] for i in np.flatnonzero(test)], True)["not_named_rate"]
    for name, score in candidates.items():
        limits = film_limits(comparison[name])
        said = outcomes(probs, score, limits, labels, min_confidence, {})
        comparison[name]["val_holdout_wrong_part_rate"] = summary(
            [said[i] for i in np.flatnonzero(val_unknown)], [], False)["wrong_part_rate"] if val_unknown.any() else None
        # How far beyond the threshold the nearest val hold-out film lies (> 1: all flagged, with room).
        comparison[name]["val_holdout_margin"] = round(float((score[val_unknown] / limits[val_unknown]).min()),
                                                       4) if val_unknown.any() and limits.min() > 0 else None
    # Chosen on val only: fewest val hold-out films and photos of them named as a known part, then the
    # widest margin between the threshold and the nearest val hold-out film.
    best = min(("mahalanobis", "mahalanobis_normalised"),
               key=lambda n: ((comparison[n]["val_holdout_wrong_part_rate"] or 0.0)
                              + comparison[n].get("val_holdout_photos_wrong_part_rate", 0.0),
                              -(comparison[n]["val_holdout_margin"] or 0.0)))
    # The shipped score must be computable from card arrays: a Mahalanobis variant (the logit scores are
    # reported for comparison). If a logit score were better, that would be reported here too.
    normalise = best == "mahalanobis_normalised"
    score, threshold = candidates[best], comparison[best]["threshold"]
    photo_threshold = comparison[best].get("photo_threshold")
    limits = film_limits(comparison[best])

    # Chest floors: films from the passing val chest films; straightened photos (less confident) from
    # the passing straightened val chest photos.
    passed_chest = val & (parts == "chest") & (score <= limits)
    chest_floor = float(max(min_confidence, np.quantile(probs[passed_chest, labels.index("chest")], 1 - chest_keep)))
    floors = {"chest": round(chest_floor, 4)} if "chest" in labels else {}
    photo_floors = None
    if photos and "chest" in labels:
        v = photos["val_known"]
        passing = v["rect"] & (v["part"] == "chest") & (v["score"][normalise] <= photo_threshold)
        photo_floor = float(max(min_confidence, np.quantile(v["probs"][passing, labels.index("chest")],
                                                            1 - chest_keep)))
        photo_floors = {"chest": round(photo_floor, 4)}
    chosen_on_curve = None
    if curve:
        # The thresholds and the chest floors from a curve on val: known parts named right (val films,
        # the pack's real val photos, synthetic val photos; the mean of the per-part shares) against
        # hold-out parts refused (hip and wrist films of train and val, never fitted on, and synthetic
        # photos of them): the most known parts kept with at most ``max_wrong`` of the hold-out named
        # as a known part and none called chest. A fixed share of val films (``keep``) refuses that
        # share of good films by design (issue #21).
        phone = np.array([r.phone_photo for r in chosen])
        val_sets = {"val_films": val & ~phone, "val_real_photos": val & phone}
        holdout_choose = unknown & (splits != "test")
        chosen_on_curve = choose_on_curve(
            {name: (probs[m], score[m], film_rect[m], parts[m]) for name, m in val_sets.items()},
            (probs[holdout_choose], score[holdout_choose], film_rect[holdout_choose]),
            ((photos["val_known"]["probs"], photos["val_known"]["score"][normalise], photos["val_known"]["rect"],
              photos["val_known"]["part"]) if photos else None),
            ((photos["holdout"]["probs"][photos["holdout"]["split"] != "test"],
              photos["holdout"]["score"][normalise][photos["holdout"]["split"] != "test"],
              photos["holdout"]["rect"][photos["holdout"]["split"] != "test"]) if photos else None),
            labels, min_confidence, max_wrong)
        threshold = chosen_on_curve["threshold"]
        photo_threshold = chosen_on_curve["photo_threshold"] if photos else None
        floors = chosen_on_curve["floors"]
        photo_floors = chosen_on_curve["photo_floors"] if photos else None
        comparison[best] = {**comparison[best], "threshold": threshold,
                            **({"photo_threshold": photo_threshold} if photos else {})}
        limits = film_limits(comparison[best])
    film_floors = np.array([photo_floors if r and photo_floors is not None else floors for r in film_rect])

    def report(mask: np.ndarray, with_open_set: bool, is_known: bool) -> dict:
        said = outcomes(probs, score if with_open_set else None, limits, labels, min_confidence,
                        film_floors if with_open_set else {})
        rows = np.flatnonzero(mask)
        return summary([said[i] for i in rows], [truth[i] for i in rows], is_known)

    def report_photos(which: str, is_known: bool) -> dict:
        p = photos[which]
        truth_rows = list(p["part"])
        before = outcomes(p["probs"], None, None, labels, min_confidence, {})
        after = photo_said(comparison[best], which, normalise, floors, photo_floors)
        return {"n": len(truth_rows), "straightened": int(p["rect"].sum()),
                "before": summary(before, truth_rows, is_known), "after": summary(after, truth_rows, is_known)}

    metrics = {
        "data": "pack manifest; known parts: train films (fit), val films (threshold, chest floor), test films "
                "(report); hold-out: every hip and wrist film, all splits, never fitted on",
        "val_known": {"before": report(val, False, True), "after": report(val, True, True)},
        "test_known": {"before": report(test, False, True), "after": report(test, True, True)},
        "holdout_unknown_parts": {"before": report(unknown, False, False), "after": report(unknown, True, False)},
        "refused_by_intake": refused,
        "straightened_films": {"val": int(film_rect[val].sum()), "test": int(film_rect[test].sum()),
                               "holdout": int(film_rect[unknown].sum())},
        "score_comparison": comparison,
    }
    if photos:
        metrics["val_photos_known"] = report_photos("val_known", True)
        metrics["holdout_photos"] = report_photos("holdout", False)
    if chosen_on_curve is not None:
        metrics["curve"] = chosen_on_curve
    spec_arrays = AuxiliaryFile(file=ARRAYS_FILE, sha256="")
    means, precision = fitted[normalise]
    spec = OpenSetSpec(
        arrays=spec_arrays, normalise=normalise, threshold=round(threshold, 4), label_min_confidence=floors,
        photo_threshold=round(photo_threshold, 4) if photo_threshold is not None else None,
        photo_label_min_confidence=photo_floors,
        method_notes=(f"{best}: squared Mahalanobis distance of the pooled features to the nearest part mean "
                      f"(shared Ledoit-Wolf covariance, fitted on {int(train.sum())} train films (the pack's real "
                      f"train photos among them) and {train_photos} synthetic photos of train films per part, "
                      f"seed {seed}); "
                      + (f"threshold, photo_threshold (phone photos: colour or a film found in them, and inputs "
                         f"the photo step straightened: OpenSetSpec.photo_view) and chest floors chosen "
                         f"on val from a curve of known parts named right (mean of the per-part shares over "
                         f"{int(val.sum())} val films and real val photos and the synthetic photos (seed 0) of at "
                         f"most {val_photos} val films per part) vs hold-out parts refused (hip and wrist films of "
                         f"train and val and {holdout_photos} synthetic photos of each): the most kept with at most "
                         f"{max_wrong:.0%} of the hold-out named and none called chest"
                         if curve else
                         f"threshold keeps {keep:.0%} of {int(val.sum())} known-part val films; photo_threshold "
                         f"(inputs the photo step straightened) keeps {photo_keep:.0%} of the straightened synthetic "
                         f"photos (seed 0) of at most {val_photos} val films per part; chest floors keep "
                         f"{chest_keep:.0%} of the val chest films (label_min_confidence) and of the straightened val "
                         "chest photos (photo_label_min_confidence) that pass (not below min_confidence)")
                      + f"; score chosen on the {int(val_unknown.sum())} val "
                      f"hold-out films and {holdout_photos} synthetic photos of each (fewest named as a known part, "
                      "then the "
                      "widest margin to the threshold); "
                      "command: python -m training open-set --model models/body_part --manifest "
                      "../shared/data/xray-pack/manifest.csv"
                      + (f" --max-wrong {max_wrong}" if curve else " --fixed-keep")),
        metrics=metrics)
    if write:
        save_file({"means": np.ascontiguousarray(means, dtype=np.float32),
                   "precision": np.ascontiguousarray(precision, dtype=np.float32)},
                  str(Path(model) / ARRAYS_FILE))
        (Path(model) / ARRAYS_FILE).chmod(0o644)
        spec.arrays = AuxiliaryFile(file=ARRAYS_FILE, sha256=sha256_of(Path(model) / ARRAYS_FILE))
        card.open_set = spec
        write_card(model, card)
    return spec.model_dump(mode="json")


def synthetic_photo_features(store: FeatureStore, chosen: list[Record], seed: int, flags: bool = True,
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(logits, pooled, rectified) of synthetic phone photos of ``chosen`` (``training.data.synthetic_photos``,
    one generator per image seeded by (seed, index)), through the service's photo step; made in
    memory only; NaN rows where the intake refuses the source file. ``rectified``: the photo step
    found and straightened the film (the pipeline's ``result.rectified``), kept beside the cache."""
    from diagnosis.photo import rectify

    from ..data.synthetic_photos import synthesise_with_corners, to_gray
    from ..features import service_view

    paths = {f"synthetic-photo:{seed}:{i}:{r.path}": r.path for i, r in enumerate(chosen)}
    flags_file = store.cache / f"{store.file.stem}-rectified.json"
    wanted, flags = flags, json.loads(flags_file.read_text()) if flags_file.is_file() else {}

    def view(key: str) -> np.ndarray | None:
        index = int(key.split(":")[2])
        gray = service_view(paths[key])
        if gray is None:
            return None
        photo = to_gray(synthesise_with_corners(gray, np.random.default_rng([seed, index]))[0])
        straightened = rectify(photo)  # gray: photographed exactly where a film was found (rectified)
        flags[key] = straightened.rectified
        return straightened.gray

    logits, pooled = store.outputs(list(paths), views=view)
    if not wanted:
        flags_file.write_text(json.dumps(flags))
        return logits, pooled, None
    for key in paths:  # rows cached before the flags were kept: redo the (cheap) photo step only
        if key not in flags and view(key) is None:
            flags[key] = False
    flags_file.write_text(json.dumps(flags))
    return logits, pooled, np.array([bool(flags[k]) for k in paths])


def film_rectified(store: FeatureStore, chosen: list[Record]) -> np.ndarray:
    """Is each file judged by the photo threshold (``OpenSetSpec.photo_view``: a phone photo, colour or
    with a film found in it, or a picture the photo step straightened; never DICOM)? The pack's real
    phone photos of films are colour: they always are. Kept beside the cache."""
    flags_file = store.cache / f"{store.file.stem}-rectified.json"
    flags = json.loads(flags_file.read_text()) if flags_file.is_file() else {}
    for record in chosen:
        key = f"photo-view:{record.path}"
        if key not in flags:
            view = service_read(record.path)
            flags[key] = view is not None and OpenSetSpec.photo_view(view.photographed, view.rectified)
    flags_file.write_text(json.dumps(flags))
    return np.array([bool(flags[f"photo-view:{r.path}"]) for r in chosen])


def photo_routing(model: Path, records: list[Record], cache: Path, split: str, limit: int | None,
                  seed: int = 0) -> dict:
    """Synthetic phone photos (``training.data.synthetic_photos``, one generator per image seeded by
    (seed, index)) of the chest films of ``split``, straightened by the service's photo step: how
    often is the body part "chest" before (top-1 + min_confidence) and after (the card's open-set
    check and chest floor)? The photos are made in memory only."""
    card = read_card(model)
    chest = sorted((r for r in records if r.split == split and r.body_part == "chest" and r.kind == "radiograph"
                    and not r.synthetic), key=by_file_name)[:limit]
    logits, pooled, rect = synthetic_photo_features(FeatureStore(model, cache), chest, seed)
    read = np.isfinite(pooled[:, 0])
    logits, pooled, rect = logits[read, : len(card.labels)].astype(np.float64), pooled[read], rect[read]
    probs = softmax(logits, axis=1)
    min_confidence = card.min_confidence or 0.0
    before = outcomes(probs, None, None, card.labels, min_confidence, {})
    entry = {"split": split, "photos": int(read.sum()), "straightened": int(rect.sum()), "seed": seed,
             "chest_before": round(before.count("chest") / max(len(before), 1), 4)}
    if card.open_set:
        spec = card.open_set
        from diagnosis.openset import BodyPartNovelty

        novelty = BodyPartNovelty(Path(model), spec, len(card.labels))
        score = mahalanobis(pooled, novelty.means, novelty.precision, spec.normalise).min(axis=1)
        limits = np.where(rect, spec.photo_threshold if spec.photo_threshold is not None else spec.threshold,
                          spec.threshold)
        floors = np.array([spec.floors_for(bool(r)) for r in rect])
        after = outcomes(probs, score, limits, card.labels, min_confidence, floors)
        entry.update(chest_after=round(after.count("chest") / max(len(after), 1), 4),
                     after=dict(Counter(after)))
    entry["before"] = dict(Counter(before))
    return entry


def main(args) -> int:
    from ..data.datasets import load_sources

    records = load_sources(args.manifest)
    if args.confident_only:
        return emit_report(fit_confident(args.model, records, args.cache, write=not args.dry_run,
                                         max_wrong=args.max_wrong), args.json)
    result = run(args.model, records, args.cache, args.keep, args.chest_keep, args.max_train_per_part,
                 write=not args.dry_run, train_photos=args.train_photos, val_photos=args.val_photos,
                 holdout_photos=args.holdout_photos, photo_keep=args.photo_keep, curve=not args.fixed_keep,
                 max_wrong=args.max_wrong)
    if args.photos:
        result["synthetic_chest_photos"] = [photo_routing(args.model, records, args.cache, split, args.photos)
                                            for split in ("val", "test")]
    return emit_report(result, args.json)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--manifest", action="append", required=True)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "open-set",
                        help="forward-pass cache (not the repository)")
    parser.add_argument("--keep", type=float, default=0.97,
                        help="share of known-part val films kept (--fixed-keep; else the reference point of the "
                             "score comparison)")
    parser.add_argument("--fixed-keep", action="store_true",
                        help="thresholds and chest floors from --keep, --photo-keep and --chest-keep instead of the "
                             "val curve of known parts kept vs hold-out parts refused")
    parser.add_argument("--chest-keep", type=float, default=0.98, help="share of passing val chest films routed")
    parser.add_argument("--max-train-per-part", type=int, default=1500)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="measure only; leave the card alone")
    parser.add_argument("--train-photos", type=int, default=300,
                        help="synthetic photos of train films per part added to the fit (0: films only)")
    parser.add_argument("--val-photos", type=int, default=300,
                        help="synthetic photos of val films per known part: the photo threshold keeps --keep of "
                             "the straightened ones (0: no photo threshold, photos get the film threshold)")
    parser.add_argument("--photo-keep", type=float, default=0.95,
                        help="share of straightened val photos the photo threshold keeps")
    parser.add_argument("--holdout-photos", type=int, default=5,
                        help="synthetic photos per hip/wrist film (seeds 0, 1, ...); val ones take part in the choice")
    parser.add_argument("--confident-only", action="store_true",
                        help="keep the fitted check; choose only its allowance for films the classifier is sure of")
    parser.add_argument("--max-wrong", type=float, default=0.05,
                        help="share of train/val hold-out films and photos that may be named as a known part "
                             "(the curve; --confident-only)")
    parser.add_argument("--photos", type=int, default=0,
                        help="also measure body part = chest on synthetic photos of N val and N test chest films")


def fit_confident(model: Path, records: list[Record], cache: Path, write: bool = True, val_photos: int = 40,
                  holdout_photos: int = 2, max_wrong: float = 0.05) -> dict:
    """The card's confident allowance (``OpenSetSpec.confident_probability`` / ``confident_threshold``),
    keeping its arrays, threshold and floors: chosen on val from a curve of known parts kept (val films,
    the pack's real val photos, synthetic photos of val films) vs hold-out parts refused (hip and wrist
    films of train and val and synthetic photos of them: never fitted on); the most known parts kept
    with at most ``max_wrong`` of the hold-out named as a known part and none called chest. Reported
    on test (known films, real photos, the test hold-out films and photos of them)."""
    from diagnosis.openset import load_arrays

    card = read_card(model)
    spec, labels = card.open_set, card.labels
    if spec is None:
        raise SystemExit(f"{model}: the card has no open_set section; run python -m training open-set first")
    arrays = load_arrays(model, spec.arrays)
    store = FeatureStore(model, cache)
    xrays = [r for r in records if r.is_xray and r.body_part and not r.synthetic]

    def rows(chosen: list[Record], seed: int | None = None) -> dict:
        if seed is None:
            logits, pooled = store.outputs([r.path for r in chosen])
            rect = film_rectified(store, chosen)
        else:
            logits, pooled, rect = synthetic_photo_features(store, chosen, seed)
        ok = np.isfinite(pooled[:, 0])  # the intake refuses the rest: never run
        probs = softmax(logits[ok, : len(labels)].astype(np.float64), axis=1)
        return {"distance": mahalanobis(pooled[ok], arrays["means"], arrays["precision"], spec.normalise).min(axis=1),
                "probs": probs, "rect": np.asarray(rect, bool)[ok],
                "part": [r.body_part for r, k in zip(chosen, ok, strict=True) if k]}

    def said(entry: dict, allowance: tuple[float | None, float | None]) -> list[str]:
        trial = spec.model_copy(update={"confident_probability": allowance[0], "confident_threshold": allowance[1]})
        out = []
        for distance, row, rect in zip(entry["distance"], entry["probs"], entry["rect"], strict=True):
            top = int(row.argmax())
            if trial.is_unknown(float(distance), float(row[top]), bool(rect)):
                out.append("unknown")
            elif row[top] < max(card.min_confidence or 0.0, trial.floors_for(bool(rect)).get(labels[top], 0.0)):
                out.append("uncertain")
            else:
                out.append(labels[top])
        return out

    def films(split: str, known: bool, photo: bool = False) -> list[Record]:
        return sorted((r for r in xrays if r.split == split and (r.body_part in labels) == known
                       and r.phone_photo == photo), key=by_file_name)

    sets = {
        "val_films": rows(films("val", True)), "val_real_photos": rows(films("val", True, photo=True)),
        "val_synthetic_photos": rows([r for part in labels
                                      for r in [f for f in films("val", True) if f.body_part == part][:val_photos]], 0),
        "test_films": rows(films("test", True)), "test_real_photos": rows(films("test", True, photo=True)),
    }
    choosing = [r for r in xrays if r.body_part not in labels and r.split != "test"]
    reporting = [r for r in xrays if r.body_part not in labels and r.split == "test"]
    sets["holdout_choose"] = _merge([rows(choosing)] + [rows(choosing, s) for s in range(holdout_photos)])
    sets["holdout_test"] = _merge([rows(reporting)] + [rows(reporting, s) for s in range(holdout_photos)])

    def figures(allowance: tuple[float | None, float | None]) -> dict:
        out = {}
        for name, entry in sets.items():
            words = said(entry, allowance)
            if name.startswith("holdout"):
                named = [w for w in words if w not in ("unknown", "uncertain")]
                out[name] = {"n": len(words), "named_known_part": len(named), "called_chest": named.count("chest"),
                             "wrong_part_rate": round(len(named) / max(len(words), 1), 4)}
            else:
                right = sum(w == t for w, t in zip(words, entry["part"], strict=True))
                out[name] = {"n": len(words), "named_right": round(right / max(len(words), 1), 4),
                             "unknown": words.count("unknown"), "uncertain": words.count("uncertain")}
        return out

    def kept(f: dict) -> float:
        known = ("val_films", "val_real_photos", "val_synthetic_photos")
        return sum(f[k]["named_right"] * f[k]["n"] for k in known) / max(sum(f[k]["n"] for k in known), 1)

    before = figures((None, None))
    best, best_figures = (None, None), before
    curve = []
    for probability in (0.9, 0.95, 0.98, 0.99, 0.995):
        for factor in np.round(np.arange(1.1, 3.01, 0.1), 2):
            allowance = (probability, round(float(spec.threshold * factor), 4))
            f = figures(allowance)
            h = f["holdout_choose"]
            ok = h["called_chest"] == 0 and h["wrong_part_rate"] <= max_wrong
            curve.append({"confident_probability": probability, "confident_threshold": allowance[1],
                          "val_known_named_right": round(kept(f), 4), "holdout_wrong_part_rate": h["wrong_part_rate"],
                          "holdout_called_chest": h["called_chest"], "allowed": ok})
            if ok and kept(f) > kept(best_figures):
                best, best_figures = allowance, f
    report = {"data": "pack manifest: val known-part films, real val photos and synthetic photos (seed 0) of at most "
                      f"{val_photos} val films per part (kept); hip and wrist films of train and val and "
                      f"{holdout_photos} synthetic photos of each (refused) choose; test reports",
              "chosen": {"confident_probability": best[0], "confident_threshold": best[1]},
              "before": before, "after": best_figures, "curve": curve}
    if write and best[0] is not None:
        card.open_set = spec.model_copy(update={
            "confident_probability": best[0], "confident_threshold": best[1],
            "method_notes": spec.method_notes + (
                f"; confident allowance: a film named with ≥ {best[0]} may lie out to {best[1]} (chosen on val: the "
                f"most known parts kept with ≤ {max_wrong:.0%} of the train/val hold-out films and photos named, none "
                "chest; command: python -m training open-set --model models/body_part --manifest "
                "../shared/data/xray-pack/manifest.csv --confident-only)"),
            "metrics": {**spec.metrics, "confident_allowance": report}})
        write_card(model, card)
    return report


def _merge(entries: list[dict]) -> dict:
    return {"distance": np.concatenate([e["distance"] for e in entries]),
            "probs": np.concatenate([e["probs"] for e in entries]),
            "rect": np.concatenate([e["rect"] for e in entries]), "part": [p for e in entries for p in e["part"]]}
