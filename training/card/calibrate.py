"""`python -m training calibrate`: calibration and operating points of a chest model, chosen on val.

The model runs exactly as the service runs it (``Pipeline.model_probabilities``: intake, photo
step, the card's preprocessing, the same runner with its mirror averaging; ONNX Runtime by default)
on the NIH films of the val and test splits whose 14 labels are all known. Its raw outputs are cached
(``--cache``, NumPy ``.npz`` without pickle, keyed by the weights' sha256 and the films). Then, on
val only:

- **calibration**: Platt scaling per output on the logit (scikit-learn ``LogisticRegression``); ECE
  (15 equal-width bins) before and after, on val and test;
- **screening** points: a label is eligible only when the 95 % bootstrap lower bound of its val AUC
  is above ``--auc-floor``; the eligible labels share a false-flag budget on val normal films (no
  finding at all): each may flag the same share of them, the largest with at most
  ``--normal-flag-rate`` of normal films flagged at all and at most 0.2 flags per normal film; a
  label whose val PPV at its point stays below ``--min-ppv`` is dropped and the others share again;
- **clinician** points: every label at the point of highest Youden's J on val among those with val
  specificity ≥ ``--clinician-min-specificity`` (0.85) that flag no more than a share of val normal
  films that is the same for every label, the largest share with at most
  ``--clinician-flags-per-normal`` (0.5) ▲ per normal film in all;
- **verdict**: a point on the normal-vs-abnormal score (the calibrated ``abnormal`` output, or a
  logistic regression on the 14 calibrated logits for a card without one) chosen so that, together
  with any screening flag, at most ``--verdict-normal-rate`` of val normal films hear "worth showing a
  doctor soon";
- **urgent** wording: only for an eligible label whose val PPV at its screening point has a 95 %
  Wilson lower bound of at least ``--urgent-ppv`` (and whose name implies urgency).

Test figures are reported next to each point and never used to choose one. Everything is written
into the card (``calibration``, ``ece``, ``operating_points``); the weights are not touched.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from diagnosis.cards import (
    Calibration,
    LabelPoint,
    ModelCard,
    OperatingPoints,
    Platt,
    PointFigures,
    VerdictPoint,
    read_card,
    write_card,
)
from diagnosis.messages import URGENT_MEANING
from diagnosis.operating import calibrated as apply_calibration
from diagnosis.operating import logit, screening_flags

from ..data.datasets import CHEST_LABELS, Record, labelled_films, targets
from ..features import drop_refused
from ..measure.metrics import ECE_BINS, bootstrap_auc_intervals, ece

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- films and raw outputs
def raw_outputs(model: Path, records: list[Record], cache: Path | None, backend: str = "onnx",
                batch: int = 32, threads: int | None = None) -> np.ndarray:
    """Raw (uncalibrated) outputs of the model on records, run through the service's own pipeline."""
    card = read_card(model, verify=True)
    key = hashlib.sha256("\n".join(str(r.path.resolve()) for r in records).encode()).hexdigest()[:16]
    path = Path(cache) / f"{card.name}-{card.weights.sha256[:16]}-{card.flip_average}-{key}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            return stored["outputs"]
    from diagnosis.config import PipelineConfig
    from diagnosis.pipeline import Pipeline

    model = Path(model).resolve()
    config = PipelineConfig(models_dir=model.parent, backend=backend, threads=threads,
                            abnormality_models={card.body_part: str(model)})
    pipeline = Pipeline.load(config)
    started, chunks = time.monotonic(), []
    for start in range(0, len(records), batch):
        datas = [r.path.read_bytes() for r in records[start:start + batch]]
        chunks.append(pipeline.model_probabilities(card.body_part, datas))
        log.info("%d / %d films (%.0f s)", start + len(datas), len(records), time.monotonic() - started)
    outputs = np.concatenate(chunks) if chunks else np.zeros((0, len(card.outputs)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, outputs=outputs)
    return outputs


# ----------------------------------------------------------------------------- metrics
def figures(truth: np.ndarray, scores: np.ndarray, threshold: float | None) -> PointFigures:
    """Sensitivity, specificity and PPV (at this split's prevalence) of ``scores ≥ threshold``, and AUC."""
    positives = int(truth.sum())
    n = len(truth)
    auc = float(roc_auc_score(truth, scores)) if 0 < positives < n else None
    result = PointFigures(n=n, positives=positives, prevalence=positives / n if n else None, auc=auc)
    if threshold is None:
        return result
    flagged = scores >= threshold
    true_pos = int((flagged & (truth == 1)).sum())
    result.sensitivity = true_pos / positives if positives else None
    result.specificity = float((~flagged & (truth == 0)).sum() / (n - positives)) if n > positives else None
    result.ppv = true_pos / int(flagged.sum()) if flagged.any() else None
    result.flagged = int(flagged.sum())  # extra field: how many films the point flags
    return result


def wilson_lower(successes: int, n: int, z: float = 1.96) -> float:
    if n == 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - margin) / (1 + z * z / n))


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# ----------------------------------------------------------------------------- fitting (val only)
def fit_platt(raw: np.ndarray, truth: np.ndarray) -> Platt:
    """Platt scaling on the logit: a nearly unregularised logistic regression of truth on logit(p)."""
    z = logit(raw).reshape(-1, 1)
    if truth.min() == truth.max():
        return Platt(a=1.0, b=0.0)
    regression = LogisticRegression(C=1e4, max_iter=1000).fit(z, truth.astype(int))
    return Platt(a=float(regression.coef_[0, 0]), b=float(regression.intercept_[0]))


def _up(threshold: float) -> float:
    """A threshold as written in the card: 6 decimals, rounded up so it never flags more than chosen."""
    return float(np.ceil(threshold * 1e6) / 1e6)


def high_specificity_threshold(normal_scores: np.ndarray, rate: float) -> float:
    """The lowest card threshold (6 decimals) at which at most ``rate`` of these (normal films')
    scores reach it."""
    ordered = np.sort(normal_scores)[::-1]
    allowed = int(np.floor(rate * len(ordered) + 1e-9))  # films that may be flagged
    if allowed >= len(ordered):
        return float(ordered[-1])  # every film may be flagged
    # above the (allowed+1)-th highest score: at most `allowed` films (fewer on ties) reach it
    return _up(float(np.nextafter(ordered[allowed], np.inf)))


def budget_share(normal_scores: np.ndarray, rate: float, max_flags: float) -> float:
    """The largest per-label share of normal films each eligible label may flag (the same for all)
    such that, on these normal films, at most ``rate`` get any flag and at most ``max_flags`` flags
    fall on a normal film on average. Starts at ``rate / k`` (always within both) and grows."""
    k = normal_scores.shape[1]
    if k == 0 or len(normal_scores) == 0:
        return 0.0
    best = rate / k
    for share in np.linspace(rate / k, rate, 200):
        thresholds = [high_specificity_threshold(normal_scores[:, j], share) for j in range(k)]
        flags = normal_scores >= np.asarray(thresholds)
        if flags.any(axis=1).mean() > rate or flags.sum(axis=1).mean() > max_flags:
            break
        best = float(share)
    return best


def lowest_threshold_with_specificity(truth: np.ndarray, scores: np.ndarray, min_specificity: float) -> float:
    """The lowest card threshold at which at least ``min_specificity`` of the negatives stay below it."""
    negatives = scores[truth == 0]
    if len(negatives) == 0:
        return 0.0
    return high_specificity_threshold(negatives, 1.0 - min_specificity)


def best_youden_at_or_above(truth: np.ndarray, scores: np.ndarray, floor: float) -> float:
    """Among thresholds ≥ ``floor`` (the card's 6 decimals), the one with the highest Youden's J on
    these films; ``floor`` itself when no higher one is better (or the split has one class only)."""
    positives, negatives = scores[truth == 1], scores[truth == 0]
    if len(positives) == 0 or len(negatives) == 0:
        return floor
    candidates = np.unique(np.concatenate([[floor], scores[scores >= floor]]))
    positives, negatives = np.sort(positives), np.sort(negatives)
    sensitivity = 1 - np.searchsorted(positives, candidates, side="left") / len(positives)  # share ≥ candidate
    specificity = np.searchsorted(negatives, candidates, side="left") / len(negatives)  # share < candidate
    best = int(np.argmax(sensitivity + specificity))  # the first (lowest) of equal J
    return floor if best == 0 else _up(float(candidates[best]))


def clinician_thresholds(cal: np.ndarray, truth: np.ndarray, normal: np.ndarray, min_specificity: float,
                         max_flags_per_normal: float, steps: int = 200,
                         ceilings: list[float | None] | None = None) -> tuple[float, list[float | None]]:
    """Clinician points, one per label, on val: each label's point is the highest-J point among those
    with specificity ≥ ``min_specificity`` that flag at most a share ``s`` of the normal films (no
    finding); ``s`` is the same for every label and the largest for which normal films get at most
    ``max_flags_per_normal`` ▲ on average. A label's ``ceilings`` entry (its screening point) caps its
    point, so that whatever screening flags is ▲ too. A label whose point catches no val film with
    it gets no point (None: a ▲ never right on val says nothing) and the others share again.
    Returns (s, thresholds)."""
    k = cal.shape[1]
    ceilings = ceilings or [None] * k
    spec_floor = [lowest_threshold_with_specificity(truth[:, j], cal[:, j], min_specificity) for j in range(k)]
    active = list(range(k))

    def points(share: float) -> list[float | None]:
        out: list[float | None] = [None] * k
        for j in active:
            point = best_youden_at_or_above(truth[:, j], cal[:, j],
                                            max(spec_floor[j], high_specificity_threshold(cal[normal, j], share)))
            out[j] = point if ceilings[j] is None else min(point, ceilings[j])
        return out

    def marks(thresholds: list[float | None]) -> float:
        columns = [j for j in range(k) if thresholds[j] is not None]
        limits = np.asarray([thresholds[j] for j in columns])
        return float((cal[normal][:, columns] >= limits).sum(axis=1).mean()) if columns else 0.0

    while True:
        best_share, best = 0.0, points(0.0)
        for share in np.linspace(0.0, 1.0 - min_specificity, steps + 1)[1:]:
            thresholds = points(float(share))
            if marks(thresholds) > max_flags_per_normal:
                break
            best_share, best = float(share), thresholds
        never_right = [j for j in active if ceilings[j] is None and not (cal[truth[:, j] == 1, j] >= best[j]).any()]
        if not never_right:
            break
        active = [j for j in active if j not in never_right]
    for j in sorted(set(range(k)) - set(active)):  # one dropped at a smaller share may be right at this one
        active.append(j)
        again = points(best_share)
        if (cal[truth[:, j] == 1, j] >= again[j]).any() and marks(again) <= max_flags_per_normal:
            best = again
        else:
            active.remove(j)
    return best_share, best


def clinician_points(labels: list[str], val_cal: np.ndarray, val_truth: np.ndarray, test_cal: np.ndarray,
                     test_truth: np.ndarray, min_specificity: float = 0.85, flags_per_normal: float = 0.5,
                     screening: dict[str, float] | None = None) -> tuple[dict[str, LabelPoint], dict]:
    """The clinician points (chosen on val, test only reported) and their entries in ``method``;
    ``screening``: the screening points of the eligible labels (a clinician point never exceeds it)."""
    screening = screening or {}
    n_labels = len(labels)
    val_abnormal = (val_truth.sum(axis=1) > 0).astype(float)
    test_abnormal = (test_truth.sum(axis=1) > 0).astype(float)
    ceilings = [screening.get(label) for label in labels]
    share, thresholds = clinician_thresholds(val_cal[:, :n_labels], val_truth, val_abnormal == 0, min_specificity,
                                             flags_per_normal, ceilings=ceilings)
    points: dict[str, LabelPoint] = {}
    for i, label in enumerate(labels):
        points[label] = LabelPoint(eligible=thresholds[i] is not None, threshold=thresholds[i],
                                   val=_round(figures(val_truth[:, i], val_cal[:, i], thresholds[i])),
                                   test=_round(figures(test_truth[:, i], test_cal[:, i], thresholds[i])))
    method = {
        "clinician": f"every label at the point of highest Youden's J on val among those with val specificity ≥ "
                     f"{min_specificity} that flag at most the same share ({_r(share)}) of val normal films (no "
                     f"finding) as every other label, the largest share with at most {flags_per_normal} ▲ per normal "
                     f"film in all (a clinician reading 14 marks learns something from ▲ only when a normal film "
                     f"rarely gets one); never above the label's screening point (what screening flags is ▲ too); "
                     f"a label whose point catches no val film with it gets no point (its estimate is still listed)",
        "clinician_min_specificity": min_specificity,
        "clinician_flags_per_normal": flags_per_normal,
        "clinician_share_per_label": _r(share),
        "clinician_flags": {"val": clinician_flag_summary(points, labels, val_cal, val_abnormal),
                            "test": clinician_flag_summary(points, labels, test_cal, test_abnormal)},
    }
    return points, method


def refit_clinician(card: ModelCard, val_raw: np.ndarray, val_truth: np.ndarray, test_raw: np.ndarray,
                    test_truth: np.ndarray, *, clinician_min_specificity: float = 0.85,
                    clinician_flags_per_normal: float = 0.5, **_ignored) -> ModelCard:
    """A copy of a calibrated ``card`` with new clinician points only, on its own calibration: the
    calibration, ECE, screening points and verdict stay exactly as they were."""
    if card.calibration is None or card.operating_points is None:
        raise SystemExit("--clinician-only needs a card calibrated before (run calibrate without it first)")
    card = card.model_copy(deep=True)
    screening = {label: p.threshold for label, p in card.operating_points.screening.items()
                 if p.eligible and p.threshold is not None}
    points, method = clinician_points(card.labels, apply_calibration(card, val_raw), val_truth,
                                      apply_calibration(card, test_raw), test_truth, clinician_min_specificity,
                                      clinician_flags_per_normal, screening)
    card.operating_points.clinician = points
    card.operating_points.method.update(method)
    return card


def clinician_flag_summary(points: dict[str, LabelPoint], labels: list[str], cal: np.ndarray,
                           abnormal: np.ndarray) -> dict:
    thresholds = np.asarray([np.inf if points[label].threshold is None else points[label].threshold
                             for label in labels])
    counts = (cal[:, :len(labels)] >= thresholds).sum(axis=1)
    return {"normal_films": int((abnormal == 0).sum()),
            "flags_per_normal_film": _r(counts[abnormal == 0].mean()),
            "normal_with_a_flag": _r((counts[abnormal == 0] > 0).mean()),
            "abnormal_with_a_flag": _r((counts[abnormal == 1] > 0).mean())}


def calibrate_card(card: ModelCard, val_raw: np.ndarray, val_truth: np.ndarray, test_raw: np.ndarray,
                   test_truth: np.ndarray, *, auc_floor: float = 0.7, normal_flag_rate: float = 0.10,
                   max_flags_per_normal: float = 0.2, min_ppv: float = 0.1,
                   verdict_normal_rate: float = 0.15, urgent_ppv: float = 0.5, bootstrap_rounds: int = 1000,
                   clinician_min_specificity: float = 0.85, clinician_flags_per_normal: float = 0.5,
                   data: str = "") -> ModelCard:
    """A copy of ``card`` with ``calibration``, ``ece`` and ``operating_points`` fitted on val."""
    labels, n_labels = card.labels, len(card.labels)
    has_abnormal = "abnormal" in card.extra_outputs
    abnormal_index = card.outputs.index("abnormal") if has_abnormal else None
    val_abnormal = (val_truth.sum(axis=1) > 0).astype(float)
    test_abnormal = (test_truth.sum(axis=1) > 0).astype(float)

    # Calibration: Platt per output (labels, then "abnormal" against "any of the 14").
    params = {label: fit_platt(val_raw[:, i], val_truth[:, i]) for i, label in enumerate(labels)}
    if has_abnormal:
        params["abnormal"] = fit_platt(val_raw[:, abnormal_index], val_abnormal)
    card = card.model_copy(deep=True)
    card.calibration = Calibration(fitted_on=f"val split: {len(val_truth)} NIH films with all 14 labels ({data})",
                                   params=params)
    val_cal, test_cal = apply_calibration(card, val_raw), apply_calibration(card, test_raw)

    # ECE before / after, per output and the mean over the labels.
    def ece_block(raw: np.ndarray, cal: np.ndarray, truth: np.ndarray, abnormal: np.ndarray) -> dict:
        block = {"n": len(truth), "before": {}, "after": {}}
        for i, label in enumerate(labels):
            block["before"][label] = _r(ece(truth[:, i], raw[:, i]))
            block["after"][label] = _r(ece(truth[:, i], cal[:, i]))
        for when, values in (("before", raw), ("after", cal)):
            block[f"mean_{when}"] = _r(np.mean([block[when][label] for label in labels]))
            if has_abnormal:
                block[when]["abnormal"] = _r(ece(abnormal, values[:, abnormal_index]))
        return block

    card.ece = {"bins": ECE_BINS, "binning": "equal width on [0, 1]",
                "val": ece_block(val_raw, val_cal, val_truth, val_abnormal),
                "test": ece_block(test_raw, test_cal, test_truth, test_abnormal)}

    # Screening: eligible labels, then a share of the false-flag budget each.
    intervals = bootstrap_auc_intervals(labels, val_truth, val_cal[:, :n_labels], bootstrap_rounds)["auc_ci"]
    eligible = [label for label in labels if (intervals.get(label) or [0, 0])[0] > auc_floor]
    normal = val_abnormal == 0
    while True:  # a label whose point is right too rarely (val PPV < min_ppv) leaves; the others share again
        share = budget_share(val_cal[normal][:, [labels.index(label) for label in eligible]], normal_flag_rate,
                             max_flags_per_normal)
        weak = [label for label in eligible
                if (figures(val_truth[:, labels.index(label)], val_cal[:, labels.index(label)],
                            high_specificity_threshold(val_cal[normal, labels.index(label)], share)).ppv or 0)
                < min_ppv]
        if not weak:
            break
        eligible = [label for label in eligible if label not in weak]
    screening: dict[str, LabelPoint] = {}
    for i, label in enumerate(labels):
        threshold = high_specificity_threshold(val_cal[normal, i], share) if label in eligible else None
        val_fig = figures(val_truth[:, i], val_cal[:, i], threshold)
        val_fig.auc_ci95 = [_r(v) for v in intervals.get(label, [])] or None
        urgent = bool(threshold is not None and label in URGENT_MEANING
                      and wilson_lower(round(val_fig.ppv * val_fig.flagged), val_fig.flagged) >= urgent_ppv)
        screening[label] = LabelPoint(eligible=threshold is not None, threshold=threshold, urgent=urgent,
                                      val=_round(val_fig), test=_round(figures(test_truth[:, i], test_cal[:, i],
                                                                                threshold)))

    clinician, clinician_method = clinician_points(
        labels, val_cal, val_truth, test_cal, test_truth, clinician_min_specificity, clinician_flags_per_normal,
        {label: p.threshold for label, p in screening.items() if p.eligible and p.threshold is not None})

    # Verdict: the score, then the point that keeps "see a doctor soon" for ≤ verdict_normal_rate of val normals.
    points = OperatingPoints(screening=screening, clinician=clinician)
    card.operating_points = points
    if has_abnormal:
        verdict = VerdictPoint(output="abnormal", threshold=0.5)
    else:
        regression = LogisticRegression(C=1.0, max_iter=2000).fit(logit(val_cal[:, :n_labels]), val_abnormal)
        verdict = VerdictPoint(output="findings_score", threshold=0.5, weights=regression.coef_[0].tolist(),
                               bias=float(regression.intercept_[0]))
    points.verdict = verdict
    from diagnosis.operating import abnormal_score

    def scores_and_flags(cal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray([abnormal_score(card, row) for row in cal]),
                np.asarray([bool(screening_flags(card, row)) for row in cal]))

    val_score, val_flag = scores_and_flags(val_cal)
    test_score, test_flag = scores_and_flags(test_cal)
    budget = max(0.0, verdict_normal_rate - val_flag[normal].mean())  # what the flags leave to the score
    candidates = val_score[normal & ~val_flag]
    verdict.threshold = high_specificity_threshold(candidates, budget * normal.sum() / max(1, len(candidates)))

    def verdict_figures(score: np.ndarray, flag: np.ndarray, truth: np.ndarray) -> PointFigures:
        shown = (score >= verdict.threshold) | flag
        fig = figures(truth, np.where(shown, 1.0, 0.0) + 0.5 * score, 1.0)  # AUC below is of the score alone
        fig.auc = float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else None
        fig.misses_per_10 = round(10 * (1 - fig.sensitivity)) if fig.sensitivity is not None else None
        fig.normal_films_told_see_doctor = _r(shown[truth == 0].mean())
        return _round(fig)

    verdict.val = verdict_figures(val_score, val_flag, val_abnormal)
    verdict.test = verdict_figures(test_score, test_flag, test_abnormal)

    def flag_summary(cal: np.ndarray, abnormal: np.ndarray) -> dict:
        counts = np.asarray([len(screening_flags(card, row)) for row in cal])
        return {"normal_films": int((abnormal == 0).sum()),
                "normal_with_a_flag": _r((counts[abnormal == 0] > 0).mean()),
                "flags_per_normal_film": _r(counts[abnormal == 0].mean()),
                "abnormal_films": int((abnormal == 1).sum()),
                "abnormal_with_a_flag": _r((counts[abnormal == 1] > 0).mean())}

    points.method = {
        "data": f"chosen on the val split only (NIH films with all 14 labels; {data}); test only reports",
        "calibration": "Platt scaling per output on the logit (scikit-learn LogisticRegression, C=1e4); "
                       "probabilities and thresholds are on the calibrated scale",
        "screening": f"eligible when the 95 % bootstrap lower bound ({bootstrap_rounds} resamples) of the val "
                     f"AUC exceeds {auc_floor}; each eligible label gets the same share ({_r(share)}) of val normal "
                     f"films (no finding) it may flag, the largest share with at most {normal_flag_rate} of "
                     f"normal films flagged at all and at most {max_flags_per_normal} flags per normal film; "
                     f"a label whose val PPV at its point is below {min_ppv} (fewer than 1 in "
                     f"{round(1 / min_ppv) if min_ppv else '∞'} flags right) is dropped and the others share again",
        "min_ppv": min_ppv,
        "screening_share_per_label": _r(share), "max_flags_per_normal": max_flags_per_normal,
        **clinician_method,
        "verdict": f"'see a doctor soon' when the {verdict.output} score reaches its threshold or any screening "
                   f"flag is raised; threshold chosen so at most {verdict_normal_rate} of val normal films hear it",
        "urgent": f"only for {', '.join(URGENT_MEANING)} when eligible and the 95 % Wilson lower bound of its val "
                  f"PPV at the screening point is ≥ {urgent_ppv}",
        "auc_floor": auc_floor, "normal_flag_rate": normal_flag_rate,
        "verdict_normal_rate": verdict_normal_rate, "urgent_ppv": urgent_ppv,
        "flags": {"val": flag_summary(val_cal, val_abnormal), "test": flag_summary(test_cal, test_abnormal)},
        "command": "python -m training calibrate --model models/chest --manifest ../shared/data/xray-pack/manifest.csv "
                   "--manifest ../shared/data/xray-pack/manifest-extra.csv",
    }
    return card


def _round(fig: PointFigures) -> PointFigures:
    data = fig.model_dump()
    return PointFigures.model_validate({k: _r(v) if isinstance(v, float) else v for k, v in data.items()})


def calibrate(model: Path, records: list[Record], data: str, cache: Path | None = None, backend: str = "onnx",
              threads: int | None = None, write: bool = True, clinician_only: bool = False, **options) -> ModelCard:
    card = read_card(model, verify=True)
    if card.body_part != "chest" or not set(card.labels) <= set(CHEST_LABELS):
        raise SystemExit("calibrate needs a chest model with ChestX-ray14 labels")
    order = [CHEST_LABELS.index(label) for label in card.labels]
    splits, refused = {}, {}
    for split in ("val", "test"):
        films = labelled_films(records, split)
        if not films:
            raise SystemExit(f"no NIH films with all 14 labels in split {split!r}")
        raw = raw_outputs(model, films, cache, backend, threads=threads)
        films, (raw,), refused[split] = drop_refused(films, raw)  # the intake refuses them: never run
        splits[split] = (raw, targets(films)[:, order])
        log.info("%s: %d films", split, len(films))
    if clinician_only:
        card = refit_clinician(card, *splits["val"], *splits["test"], **options)
    else:
        card = calibrate_card(card, *splits["val"], *splits["test"], data=data, **options)
    card.operating_points.method["refused_by_intake"] = refused
    if write:
        write_card(model, card)
    return card


def summary(card: ModelCard) -> dict:
    """The figures a person reads: ECE, flags, screening points, verdict."""
    points = card.operating_points
    return {
        "ece_mean": {split: {"before": card.ece[split]["mean_before"], "after": card.ece[split]["mean_after"]}
                     for split in ("val", "test")},
        "ece_abnormal": {split: {w: card.ece[split][w].get("abnormal") for w in ("before", "after")}
                         for split in ("val", "test")},
        "flags": points.method["flags"],
        "screening": {label: {"threshold": p.threshold, "urgent": p.urgent,
                              "val": p.val.model_dump(include={"sensitivity", "specificity", "ppv", "prevalence",
                                                               "auc", "auc_ci95"}),
                              "test": p.test.model_dump(include={"sensitivity", "specificity", "ppv",
                                                                 "prevalence", "auc"})}
                      for label, p in points.screening.items() if p.eligible},
        "not_eligible": [label for label, p in points.screening.items() if not p.eligible],
        "clinician_flags": points.method.get("clinician_flags"),
        "clinician": {label: {"threshold": p.threshold,
                              "val": p.val.model_dump(include={"sensitivity", "specificity", "ppv", "auc"}),
                              "test": p.test.model_dump(include={"sensitivity", "specificity", "ppv"})}
                      for label, p in points.clinician.items()},
        "verdict": {"output": points.verdict.output, "threshold": points.verdict.threshold,
                    "val": points.verdict.val.model_dump(), "test": points.verdict.test.model_dump()},
    }
