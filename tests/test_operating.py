"""Calibration, operating points and verdicts: fitting on val (synthetic outputs), applying them at inference."""

import json

import numpy as np
import pytest
from conftest import ROOT, encode, gradient
from model_factory import CHEST_LABELS, make_models_dir
from PIL import Image

from diagnosis.cards import ModelCard, read_card
from diagnosis.messages import render_reply
from diagnosis.operating import assess, calibrated, logit, sigmoid
from diagnosis.pipeline import Pipeline
from training.card.calibrate import calibrate_card, high_specificity_threshold
from training.measure.metrics import ece

IMAGE = encode(Image.fromarray(gradient(300, 260, texture=True)), "JPEG")
STRONG = ("Effusion", "Cardiomegaly")  # the synthetic model separates these well, the rest barely


def synthetic_split(n: int, seed: int, abnormal_output: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs of an over-confident model: strong labels well separated, the others almost noise."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, len(CHEST_LABELS))) < 0.06).astype(float)
    separation = np.asarray([2.5 if label in STRONG else 0.2 for label in CHEST_LABELS])
    z = -3 + separation * truth + rng.normal(0, 1, truth.shape)
    raw = sigmoid(2.0 * z + 1.5)  # miscalibrated: too steep and too high
    if abnormal_output:
        any_finding = truth.max(axis=1)
        raw = np.column_stack([raw, sigmoid(1.5 * any_finding - 1 + rng.normal(0, 1, n) + 1.0)])
    return raw, truth


def card_for(abnormal_output: bool = True) -> ModelCard:
    return ModelCard(name="chest", version="t", role="abnormality", body_part="chest", labels=CHEST_LABELS,
                     extra_outputs=["abnormal"] if abnormal_output else [], activation="sigmoid",
                     input={"size": 64}, weights={"sha256": "0" * 64},
                     thresholds=dict.fromkeys(CHEST_LABELS, 0.3))


@pytest.fixture(scope="module")
def fitted():
    val, test = synthetic_split(3000, 0), synthetic_split(2000, 1)
    return calibrate_card(card_for(), *val, *test, bootstrap_rounds=100), val, test


def test_only_labels_the_model_is_good_at_are_eligible_and_normal_films_are_rarely_flagged(fitted):
    card, (val_raw, val_truth), _ = fitted
    points = card.operating_points
    assert {label for label, p in points.screening.items() if p.eligible} == set(STRONG)
    assert all(p.threshold is None for label, p in points.screening.items() if label not in STRONG)
    normal = val_truth.sum(axis=1) == 0
    flags = np.asarray([[f.positive for f in assess(card, row)[0]] for row in val_raw[normal]])
    assert flags.any(axis=1).mean() <= 0.10 and flags.sum(axis=1).mean() <= 0.2
    assert points.method["flags"]["val"]["normal_with_a_flag"] <= 0.10
    for label in STRONG:  # high specificity, and its figures are written for val and test
        point = points.screening[label]
        assert point.val.specificity >= 0.9 and point.val.sensitivity > 0.2 and point.test.ppv is not None
        assert point.val.prevalence == pytest.approx(val_truth[:, CHEST_LABELS.index(label)].mean(), abs=1e-4)


def test_platt_scaling_lowers_the_calibration_error(fitted):
    card, _, (test_raw, test_truth) = fitted
    for split in ("val", "test"):
        assert card.ece[split]["mean_after"] < card.ece[split]["mean_before"]
    i = CHEST_LABELS.index("Effusion")
    assert ece(test_truth[:, i], calibrated(card, test_raw)[:, i]) < ece(test_truth[:, i], test_raw[:, i])


def test_clinician_points_cover_every_label_and_the_verdict_respects_its_budget(fitted):
    card, (val_raw, val_truth), _ = fitted
    points = card.operating_points
    assert set(points.clinician) == set(CHEST_LABELS)
    assert all(p.val.auc is not None for p in points.clinician.values())
    for p in points.clinician.values():  # no point only where the point would never have been right on val
        assert p.threshold is not None or p.val.sensitivity is None
    verdicts = [assess(card, row)[2] for row in val_raw[val_truth.sum(axis=1) == 0]]
    assert set(verdicts) <= {"no_strong_sign", "see_doctor"}  # urgent needs a label allowed to say it
    assert verdicts.count("see_doctor") / len(verdicts) <= 0.15 + 1e-9
    assert 0 < points.verdict.val.sensitivity < 1 and points.verdict.val.misses_per_10 is not None


def test_clinician_points_keep_specificity_and_the_per_film_budget_on_val(fitted):
    """▲ means something: every point keeps val specificity ≥ 0.85, and normal val films get at most
    0.5 ▲ each, all 14 labels together; the verdict is the same whatever the mode."""
    card, (val_raw, val_truth), _ = fitted
    points, method = card.operating_points, card.operating_points.method
    assert method["clinician_min_specificity"] == 0.85 and method["clinician_flags_per_normal"] == 0.5
    for label, point in points.clinician.items():
        if point.threshold is None:
            continue
        assert point.val.specificity >= 0.85, label
        assert point.val.sensitivity > 0 and point.test.specificity is not None  # each point was right on val
        screening = points.screening[label]
        if screening.eligible:  # whatever screening flags is ▲ too
            assert point.threshold <= screening.threshold, label
    normal = val_raw[val_truth.sum(axis=1) == 0]
    marks = [sum(f.positive for f in assess(card, row, "clinician")[0]) for row in normal]
    assert np.mean(marks) <= 0.5 + 1e-9
    assert method["clinician_flags"]["val"]["flags_per_normal_film"] == pytest.approx(np.mean(marks), abs=1e-4)
    for row in val_raw[:200]:
        assert assess(card, row, "clinician")[2] == assess(card, row, "screening")[2]


def test_refitting_the_clinician_points_leaves_every_other_section_as_it_was(fitted):
    from training.card.calibrate import refit_clinician

    card, val, test = fitted
    again = refit_clinician(card, *val, *test, clinician_flags_per_normal=0.25)
    before, after = card.model_dump(mode="json"), again.model_dump(mode="json")
    for key in before:
        if key != "operating_points":
            assert before[key] == after[key], key
    for key in ("screening", "verdict"):
        assert before["operating_points"][key] == after["operating_points"][key], key
    method = after["operating_points"]["method"]
    assert method["clinician_flags_per_normal"] == 0.25
    assert method["flags"] == before["operating_points"]["method"]["flags"]
    assert method["clinician_flags"]["val"]["flags_per_normal_film"] <= 0.25


def test_clinician_findings_are_ordered_by_estimate_relative_to_their_point(fitted):
    card = fitted[0]
    row = np.full(len(card.outputs), 0.2)
    findings, _, _ = assess(card, row, "clinician")
    margins = [logit(f.probability) - logit(f.threshold) if f.threshold is not None else -np.inf for f in findings]
    assert margins == sorted(margins, reverse=True)
    assert [f.margin for f in findings] == pytest.approx(margins)
    flagged = [f.positive for f in findings]
    assert flagged == sorted(flagged, reverse=True)  # every ▲ before every finding without one


def test_clinician_thresholds_spend_the_budget_on_normal_films():
    from training.card.calibrate import clinician_thresholds

    rng = np.random.default_rng(1)
    truth = (rng.random((3000, 5)) < 0.1).astype(float)
    scores = np.clip(rng.normal(0.3 + 0.3 * truth, 0.15), 0.001, 0.999)
    normal = truth.sum(axis=1) == 0
    share, thresholds = clinician_thresholds(scores, truth, normal, 0.85, 0.25)
    assert all(t is not None for t in thresholds)
    flags = scores >= np.asarray(thresholds)
    assert flags[normal].sum(axis=1).mean() <= 0.25 and share > 0
    for j in range(5):
        assert (~flags[truth[:, j] == 0, j]).mean() >= 0.85
    looser = clinician_thresholds(scores, truth, normal, 0.85, 1.0)[1]
    assert all(a <= b for a, b in zip(looser, thresholds, strict=True))  # a larger budget never raises a point
    capped = clinician_thresholds(scores, truth, normal, 0.85, 0.25, ceilings=[0.3, None, None, None, None])[1]
    assert capped[0] <= 0.3
    useless = truth.copy()
    useless[:, 4] = 0
    useless[np.argsort(scores[:, 4])[:20], 4] = 1  # its positives have the lowest scores: no point catches one
    kept = clinician_thresholds(scores, useless, useless.sum(axis=1) == 0, 0.85, 0.25)[1]
    assert kept[4] is None and all(t is not None for t in kept[:4])


def test_a_card_without_an_abnormal_output_gets_a_score_fitted_on_the_labels():
    val, test = synthetic_split(2000, 2, abnormal_output=False), synthetic_split(1000, 3, abnormal_output=False)
    card = calibrate_card(card_for(abnormal_output=False), *val, *test, bootstrap_rounds=50)
    verdict = card.operating_points.verdict
    assert verdict.output == "findings_score" and len(verdict.weights) == len(CHEST_LABELS)
    _, score, _ = assess(card, val[0][0])
    assert score is not None and 0 < score < 1


def test_the_fitted_card_round_trips_through_json(fitted):
    card = fitted[0]
    again = ModelCard.model_validate(json.loads(json.dumps(card.model_dump(mode="json"))))
    effusion = card.operating_points.screening["Effusion"]
    assert again.operating_points.screening["Effusion"].threshold == effusion.threshold
    assert again.calibration.params["abnormal"] == card.calibration.params["abnormal"]


def test_high_specificity_threshold_flags_at_most_the_share():
    scores = np.random.default_rng(0).random(1000)
    for rate in (0.0, 0.01, 0.05, 0.3):
        assert (scores >= high_specificity_threshold(scores, rate)).mean() <= rate


def test_modes_decide_what_is_flagged(fitted):
    card = fitted[0]
    row = np.full(len(card.outputs), 0.5)
    row[CHEST_LABELS.index("Nodule")] = 0.999  # not eligible: never flagged in screening
    screening, _, _ = assess(card, row, "screening")
    clinician, _, _ = assess(card, row, "clinician")
    assert "Nodule" not in {f.label for f in screening if f.positive}
    assert "Nodule" in {f.label for f in clinician if f.positive}
    nodule = next(f for f in clinician if f.label == "Nodule")
    assert nodule.threshold == card.operating_points.clinician["Nodule"].threshold and nodule.auc is not None
    probabilities = [f.probability for f in screening]
    assert probabilities == sorted(probabilities, reverse=True)
    assert logit(sigmoid(np.asarray([-3.0, 0.0, 4.0]))) == pytest.approx([-3.0, 0.0, 4.0])
    with pytest.raises(ValueError, match="mode"):
        assess(card, row, "oracle")


def test_an_old_card_flags_nothing_in_screening_and_is_unsure(tmp_path):
    pipeline = Pipeline.load(make_models_dir(tmp_path, operating_points=False))
    screening, clinician = (a.result for a in pipeline.run_batch([IMAGE, IMAGE], modes=["screening", "clinician"]))
    assert screening.verdict == "unsure" and not screening.positive_findings
    assert screening.heatmap_labels == [screening.findings[0].label]  # nothing flagged: the top one is drawn
    assert "Verdict: unsure" in render_reply(screening) and "Highest model estimates" in render_reply(screening)
    # clinician mode falls back on the card's own thresholds (0.5 here)
    assert {f.label for f in clinician.positive_findings} == {"Effusion", "Cardiomegaly"}
    assert clinician.mode == "clinician" and "All findings" in render_reply(clinician)


def test_pipeline_modes_per_image_and_verdict(fake_models):
    pipeline = Pipeline.load(fake_models)
    screening, clinician = (a.result for a in pipeline.run_batch([IMAGE, IMAGE], modes=["screening", "clinician"],
                                                                 make_overlay=False))
    assert screening.mode == "screening" and clinician.mode == "clinician"
    assert screening.verdict == clinician.verdict == "see_doctor"  # flags raised
    assert {f.label for f in screening.positive_findings} == {"Effusion", "Cardiomegaly"}
    assert all(f.eligible and f.sensitivity == 0.6 for f in screening.findings)
    with pytest.raises(ValueError, match="mode"):
        pipeline.run_batch([IMAGE], modes=["oracle"])


def test_shipped_chest_card_is_calibrated_with_points_chosen_on_val():
    card = read_card(ROOT / "models" / "chest", verify=False)
    points = card.operating_points
    assert card.calibration and set(card.calibration.params) == set(card.outputs)
    assert "val split" in points.method["data"] and points.verdict.output == "abnormal"
    assert points.method["flags"]["val"]["normal_with_a_flag"] <= 0.10
    assert points.method["flags"]["val"]["flags_per_normal_film"] <= 0.2
    for label, point in points.screening.items():
        if point.eligible:  # the floor on the bootstrap lower bound of val AUC
            assert point.val.auc_ci95[0] > points.method["auc_floor"], label
    assert card.ece["val"]["mean_after"] < card.ece["val"]["mean_before"]
    # clinician ▲: val specificity ≥ 0.85 each, ≤ 0.5 ▲ per normal film (val chose, test reports), figures kept
    for label, point in points.clinician.items():
        assert point.threshold is None or (point.val.specificity >= 0.85 and point.val.sensitivity > 0), label
        if points.screening[label].eligible:
            assert point.threshold <= points.screening[label].threshold, label
    assert points.method["clinician_flags"]["val"]["flags_per_normal_film"] <= 0.5
    assert points.method["clinician_flags"]["test"]["flags_per_normal_film"] <= 0.5


def test_measure_replies_counts_what_the_real_pipeline_flags(pack):
    from training.data.datasets import labelled_films, load_manifest
    from training.measure.replies import measure

    films = labelled_films(load_manifest(pack / "manifest.csv"), "test")
    normal = [r for r in films if not any(r.chest_labels)][:3]
    abnormal = [r for r in films if r.chest_labels[2] == 1][:3]  # Effusion, a label screening can flag
    report = measure(normal + abnormal, ROOT / "models", "test", backend="torch")
    assert report["films"] == 6 and report["normal_films"] == 3 and report["abnormal_films"] == 3
    assert sum(report["outcomes"].values()) == 6 and sum(report["verdicts"].values()) == 6
    assert 0 <= report["normal_with_a_flag"] <= 1 and report["flags_per_normal_film"] >= 0
    card = read_card(ROOT / "models" / "chest", verify=False)
    eligible = {label for label, p in card.operating_points.screening.items() if p.eligible}
    assert {label for label, row in report["per_label"].items() if row["flagged"]} <= eligible
