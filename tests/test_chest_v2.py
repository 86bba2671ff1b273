"""Chest model v2: several manifests, partial labels (masked loss), the extra "abnormal" output from
card to network to pipeline (torch and ONNX, with mirror averaging), and evaluate's new figures."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, encode, gradient
from model_factory import CHEST_LABELS, make_model, make_models_dir
from PIL import Image
from safetensors.torch import load_file

from diagnosis.cards import CardError, read_card
from diagnosis.intake import decode
from diagnosis.network import load_model
from diagnosis.photo import rectify
from diagnosis.pipeline import Pipeline
from diagnosis.preprocess import to_model_input
from training.data.datasets import load_sources
from training.data.tasks import make_task
from training.fit.train import TrainConfig, initialise
from training.measure.metrics import bootstrap_auc_intervals, masked_auc
from training.runtime import masked_bce

IMAGE = encode(Image.fromarray(gradient(300, 260, texture=True)), "PNG")
COLUMNS = ["path", "source", "split", "is_xray", "body_part", "patient_id", "phone_photo", "kind", *CHEST_LABELS]
EXTRA = ["abnormal", "chest_labels", "population"]


def film(path, seed: int, bright: bool = True) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(120 if bright else 20, 255 if bright else 120, (72, 72), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def two_manifests(tmp_path_factory):
    """manifest.csv (NIH rows, all 14 labels) + manifest-extra.csv (all14, normal and partial rows)."""
    root = tmp_path_factory.mktemp("pack2")
    rows, extra = [], []
    for split, count in (("train", 4), ("val", 4), ("test", 4)):
        for i in range(count):
            labels = [int((i + j) % 2 == 0) for j in range(14)] if i % 2 else [0] * 14
            name = f"images/nih_cxr14/{split}_{i}.png"
            film(root / name, hash((split, i)) % 1000, bright=bool(i % 2))
            rows.append([name, "nih_cxr14", split, 1, "chest", f"p{i}", 0, "radiograph", *labels])
            name = f"images/rsna_normal/{split}_{i}.png"
            film(root / name, 7 + i)
            extra.append([name, "rsna_normal", split, 1, "chest", f"r{i}", 0, "radiograph", *[0] * 14,
                          0, "normal", "adult"])
            name = f"images/covid_radiography/{split}_{i}.png"
            film(root / name, 11 + i)
            extra.append([name, "covid_radiography", split, 1, "chest", f"c{i}", 0, "radiograph", *[""] * 14,
                          1, "partial", "adult"])
            name = f"images/nih_extra/{split}_{i}.png"
            film(root / name, 13 + i, bright=bool(i % 2))
            pneumonia = ["1" if label == "Pneumonia" else "" for label in CHEST_LABELS]
            extra.append([name, "nih_extra", split, 1, "chest", f"e{i}", 0, "radiograph", *pneumonia, "",
                          "partial", "adult"])
    for file, header, data in (("manifest.csv", COLUMNS, rows), ("manifest-extra.csv", COLUMNS + EXTRA, extra)):
        with (root / file).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(data)
    return root / "manifest.csv", root / "manifest-extra.csv"


def test_several_manifests_partial_labels_and_abnormal(two_manifests):
    records = load_sources([str(m) for m in two_manifests])
    assert len(records) == 12 * 4
    by_source = {r.source: r for r in records if r.split == "train" and r.path.stem == "train_1"}
    nih, rsna, covid, extra = (by_source[s] for s in ("nih_cxr14", "rsna_normal", "covid_radiography", "nih_extra"))
    assert nih.chest_labels.count(None) == 0 and nih.abnormal == 1  # derived: a finding is present
    assert rsna.chest_labels == (0,) * 14 and rsna.abnormal == 0 and rsna.population == "adult"
    assert covid.chest_labels == (None,) * 14 and covid.abnormal == 1
    assert extra.chest_labels[CHEST_LABELS.index("Pneumonia")] == 1 and extra.chest_labels.count(None) == 13
    assert extra.abnormal == 1  # empty cell, but a known positive finding

    task = make_task("chest", records)
    assert task.outputs == [*CHEST_LABELS, "abnormal"]
    target = task.target(covid)
    assert np.isnan(target[:14]).all() and target[14] == 1
    assert task.target(rsna).tolist() == [0.0] * 15
    assert task.balance_group(covid) == "covid_radiography"
    assert all(task.applies(r) for r in records)


def test_masked_bce_unknown_labels_give_no_loss_and_no_gradient():
    logits = torch.randn(4, 15, requires_grad=True)
    target = torch.randint(0, 2, (4, 15)).float()
    target[0, :14] = float("nan")  # a COVID film: only "abnormal" is known
    target[1, 3] = float("nan")
    loss = masked_bce(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert (logits.grad[0, :14] == 0).all() and logits.grad[1, 3] == 0
    assert (logits.grad[0, 14] != 0) and (logits.grad[2] != 0).all()
    known = ~torch.isnan(target)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    full = torch.randint(0, 2, (4, 15)).float()  # all known: the usual mean BCE
    assert masked_bce(logits, full).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, full).item(), rel=1e-6)


@pytest.fixture(scope="module")
def abnormal_models(tmp_path_factory):
    """A models folder whose chest card declares extra_outputs ["abnormal"] and mirror averaging."""
    root = make_models_dir(tmp_path_factory.mktemp("models_v2"))
    biases = [-4.0] * 14 + [1.5]
    make_model(root / "chest", role="abnormality", body_part="chest", labels=CHEST_LABELS, activation="sigmoid",
               biases=biases, thresholds=dict.fromkeys(CHEST_LABELS, 0.5), size=64, extra_outputs=["abnormal"],
               flip_average=True)
    return root


def test_card_and_network_carry_the_extra_output(abnormal_models, fake_models, tmp_path):
    card, network = load_model(abnormal_models / "chest")
    assert card.extra_outputs == ["abnormal"] and card.outputs[-1] == "abnormal"
    assert network.classifier.out_features == 15
    old = read_card(fake_models / "chest")  # a card written before extra outputs existed
    assert old.extra_outputs == [] and old.outputs == old.labels
    # 14 outputs in the weights but 15 named by the card: refused
    folder = tmp_path / "chest"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes((fake_models / "chest" / "weights.safetensors").read_bytes())
    data = json.loads((fake_models / "chest" / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**data, "extra_outputs": ["abnormal"]}))
    with pytest.raises(CardError, match="extra outputs"):
        load_model(folder)
    (folder / "card.json").write_text(json.dumps({**data, "extra_outputs": ["Hernia"]}))
    with pytest.raises(CardError, match="differ from the labels"):
        read_card(folder, verify=False)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pipeline_reports_abnormal_probability(abnormal_models, fake_models, backend, tmp_path):
    result = Pipeline.load(abnormal_models, backend=backend, cache_dir=tmp_path).run(IMAGE).result
    assert result.outcome == "analysed" and result.body_part == "chest"
    assert [f.label for f in result.findings] and {f.label for f in result.findings} == set(CHEST_LABELS)
    # the same number the network gives: mean of the image's and its mirror's logits, then sigmoid
    card, network = load_model(abnormal_models / "chest")
    spec = card.input
    x = torch.from_numpy(to_model_input(rectify(decode(IMAGE).gray).gray, spec.size, spec.mean, spec.std))[None]
    with torch.no_grad():
        expected = torch.sigmoid(network(x))[0, 14].item()
        mirrored = torch.sigmoid((network.head(network.forward_features(x)) +
                                  network.head(network.forward_features(x.flip(3)))) / 2)[0, 14].item()
    assert expected == pytest.approx(mirrored, abs=1e-6)
    assert result.abnormal_probability == pytest.approx(expected, abs=1e-4)
    # a card with neither an abnormal output nor a fitted score (written before `calibrate`): None
    old_models = make_models_dir(tmp_path / "old", operating_points=False)
    old = Pipeline.load(old_models, backend=backend, cache_dir=tmp_path).run(IMAGE).result
    assert old.outcome == "analysed" and old.abnormal_probability is None
    # with a score fitted on the 14 outputs (verdict "findings_score"), that score
    derived = Pipeline.load(fake_models, backend=backend, cache_dir=tmp_path).run(IMAGE).result
    assert 0 <= derived.abnormal_probability <= 1 and derived.verdict == "see_doctor"


def test_cli_json_shows_abnormal_probability(abnormal_models, tmp_path):
    image = tmp_path / "film.png"
    image.write_bytes(IMAGE)
    proc = subprocess.run([sys.executable, "-m", "diagnosis.cli", str(image), "--json", "--models",
                           str(abnormal_models), "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < line["abnormal_probability"] < 1


def test_fourteen_output_model_continues_with_a_fifteenth(fake_models, tmp_path):
    _, old = load_model(fake_models / "chest")
    task = make_task("chest", [])
    model = type(old)(len(task.outputs))
    description = initialise(model, TrainConfig(task="chest", out=tmp_path, init_from=fake_models / "chest"),
                             task.outputs)
    assert "whole network" in description and "abnormal" in description
    assert torch.equal(model.classifier.weight[:14], old.classifier.weight)
    assert torch.equal(model.features.conv0.weight, old.features.conv0.weight)


def test_bootstrap_intervals_bracket_the_auc():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, (300, 2)).astype(float)
    scores = truth + rng.normal(0, 1.0, truth.shape)
    truth[:50, 1] = np.nan
    report = bootstrap_auc_intervals(["a", "b"], truth, scores, rounds=200)
    from training.measure.metrics import _rank_auc

    assert _rank_auc(truth[:, 1], scores[:, 1]) == pytest.approx(masked_auc(truth[:, 1], scores[:, 1]))
    for index, label in enumerate("ab"):
        low, high = report["auc_ci"][label]
        assert low < masked_auc(truth[:, index], scores[:, index]) < high and high - low < 0.2
    assert report["mean_auc_ci"][0] < report["mean_auc_ci"][1]


def test_train_two_manifests_export_and_evaluate_keys(two_manifests, tmp_path):
    base, extra = (str(m) for m in two_manifests)

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir, model = tmp_path / "run", tmp_path / "models" / "chest"
    run("train", "--task", "chest", "--manifest", base, "--manifest", extra, "--out", str(run_dir), "--size", "32",
        "--batch-size", "4", "--epochs", "1", "--epoch-size", "8", "--group-share", "covid_radiography=0.2")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["task"]["extra_outputs"] == ["abnormal"] and "abnormal_auc" in state["history"][0]
    assert state["config"]["group_shares"] == {"covid_radiography": 0.2}
    run("export", "--run", str(run_dir), "--out", str(model), "--manifest", base, "--manifest", extra)
    card = read_card(model)
    assert card.extra_outputs == ["abnormal"] and set(card.thresholds) == set(CHEST_LABELS)
    assert "--manifest" in card.metrics["measured_with"] and "covid_radiography" in {
        s["source"] for s in card.data_sources}

    out = tmp_path / "eval.json"
    run("evaluate", "--model", str(model), "--manifest", base, "--manifest", extra, "--split", "test",
        "--json", str(out), "--bootstrap-rounds", "50")
    report = json.loads(out.read_text())
    assert {"n", "auc", "mean_auc", "skipped_labels", "positives"} <= report.keys()  # the old keys stay
    assert report["n"] == 8  # NIH films only: 4 nih_cxr14 + 4 nih_extra test films
    assert 0 <= report["abnormal_auc"] <= 1 and len(report["abnormal_auc_ci"]) == 2
    assert set(report["auc_ci"]) <= set(report["auc"]) and len(report["mean_auc_ci"]) == 2
    assert report["all_sources"]["n"] == 16 and 0 <= report["all_sources"]["abnormal_auc"] <= 1
    per_source = report["per_source"]
    assert per_source["covid_radiography"]["abnormal"] == 4
    assert "abnormal_auc_vs_nih_other_class" in per_source["covid_radiography"]
    assert "abnormal_auc" in per_source["nih_cxr14"]


def test_top_fine_tune_on_cached_inputs_trains_resumes_and_ships(two_manifests, abnormal_models, tmp_path):
    """training.fit.top: the cached transition3 outputs + the top reproduce the whole network; training
    moves the weights, keeps the best val epoch, resumes, and its run exports as an ordinary model."""
    from training.fit.heads import FeatureCache, _Split
    from training.fit.top import Top

    base, extra = (str(m) for m in two_manifests)
    cache_dir, run_dir = tmp_path / "cache", tmp_path / "top"

    def run(module, *args):
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    model = abnormal_models / "chest"
    run("training", "heads", "--model", str(model), "--manifest", base, "--manifest", extra, "--cache", str(cache_dir),
        "--extract-only", "--mirror-train")
    cache = FeatureCache(model, cache_dir, threads=1)
    records = [r for r in load_sources([base, extra]) if r.split == "train" and r.source == "nih_cxr14"]
    assert all(cache.has(r, False) and cache.has(r, True) for r in records)  # mirrors of NIH train films

    _, network = load_model(model)
    pixels = torch.from_numpy(to_model_input(Image.fromarray(gradient(90, 80, texture=True)), 64, 0.5, 0.25))[None]
    with torch.no_grad():
        middle, _ = _Split(network)(pixels)
        assert torch.allclose(Top(network, 0.0).eval()(middle), network.eval().forward_features(pixels).mean(
            (2, 3)) @ network.classifier.weight.T + network.classifier.bias, atol=1e-5)

    data = ("--model", str(model), "--manifest", base, "--manifest", extra, "--cache", str(cache_dir))
    common = (*data, "--out", str(run_dir), "--epoch-size", "16", "--batch", "8", "--lr", "1e-2", "--patience", "99",
              "--cosine")
    run("training", "top", *common, "--epochs", "1")
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["epoch"] == 1 and [h["epoch"] for h in progress["history"]] == [0, 1]
    run("training", "top", *common, "--epochs", "2")  # resumes after epoch 1
    progress = json.loads((run_dir / "progress.json").read_text())
    assert [h["epoch"] for h in progress["history"]] == [0, 1, 2]
    state = json.loads((run_dir / "state.json").read_text())
    best = max(progress["history"], key=lambda h: h["mean_auc_15"])
    assert state["epoch"] == best["epoch"] and state["task"]["extra_outputs"] == ["abnormal"]

    trained = {k: v for k, v in load_file(str(run_dir / "best.safetensors")).items()}
    shipped = load_file(str(model / "weights.safetensors"))
    frozen = [k for k in shipped if k.startswith("features.") and not k.startswith(("features.denseblock4",
                                                                                    "features.norm5"))]
    assert all(torch.equal(trained[k].to(shipped[k].dtype), shipped[k]) for k in frozen)  # bottom untouched
    last = load_file(str(run_dir / "last.safetensors"))  # training moved the top
    assert not torch.allclose(last["top.classifier.weight"], shipped["classifier.weight"].float())
    assert not torch.allclose(last["top.block.denseblock4.denselayer16.conv2.weight"],
                              shipped["features.denseblock4.denselayer16.conv2.weight"].float())
    # A soup: the average of two runs' best tops, shipped as one ordinary run.
    other, soup = tmp_path / "top2", tmp_path / "soup"
    run("training", "top", *data, "--out", str(other), "--epoch-size", "16", "--batch", "8", "--lr", "1e-2",
        "--epochs", "1", "--seed", "3", "--patience", "9")
    run("training", "top", *data, "--out", str(soup), "--soup", str(run_dir), "--soup", str(other))
    tops = [load_file(str(d / "best-top.safetensors")) for d in (run_dir, other, soup)]
    key = "top.block.denseblock4.denselayer1.conv1.weight"
    assert torch.allclose(tops[2][key], (tops[0][key] + tops[1][key]) / 2)
    assert json.loads((soup / "state.json").read_text())["history"][-1]["soup"] == ["top", "top2"]
    run("training", "export", "--run", str(soup), "--out", str(tmp_path / "models" / "chest"),
        "--manifest", base, "--manifest", extra)
    card, exported = load_model(tmp_path / "models" / "chest")
    assert card.extra_outputs == ["abnormal"] and exported.classifier.out_features == 15
