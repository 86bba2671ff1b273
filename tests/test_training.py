"""Training data loaders (pack + native layouts), a tiny real training run, resume, export, evaluate."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from tiny_pack import run_training, write_tiny_pack

from training.data.datasets import CHEST_LABELS, load_chestxray14, load_folder_tree, load_manifest, load_mura
from training.data.tasks import make_task


def write_image(path, seed, size=72, bright=False):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (size, size), dtype=np.uint8) + (120 if bright else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_native_chestxray14_layout(tmp_path):
    rows = [("00000001_000.png", "Effusion|Mass", "1"), ("00000001_001.png", "No Finding", "1"),
            ("00000002_000.png", "Hernia", "2"), ("00000003_000.png", "Atelectasis", "3")]
    with (tmp_path / "Data_Entry_2017.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        for name, labels, patient in rows:
            writer.writerow([name, labels, 0, patient])
            write_image(tmp_path / "images" / name, 0)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n")
    records = {r.path.name: r for r in load_chestxray14(tmp_path)}
    assert records["00000003_000.png"].split == "test"
    first = records["00000001_000.png"]
    assert first.chest_labels[CHEST_LABELS.index("Effusion")] == 1
    assert first.chest_labels[CHEST_LABELS.index("Mass")] == 1 and sum(first.chest_labels) == 2
    assert sum(records["00000001_001.png"].chest_labels) == 0
    assert records["00000001_000.png"].split == records["00000001_001.png"].split  # patient-wise
    assert all(r.path.is_file() for r in records.values())


def test_native_mura_layout(tmp_path):
    root = tmp_path / "MURA-v1.1"
    train = ["MURA-v1.1/train/XR_HAND/patient00001/study1_positive/image1.png",
             "MURA-v1.1/train/XR_ELBOW/patient00002/study1_negative/image1.png"]
    valid = ["MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/image1.png"]
    for line in train + valid:
        write_image(tmp_path / line, 1)
    (root / "train_image_paths.csv").write_text("\n".join(train) + "\n")
    (root / "valid_image_paths.csv").write_text("\n".join(valid) + "\n")
    records = load_mura(tmp_path)
    assert sorted(r.body_part for r in records) == ["elbow", "hand", "wrist"]
    assert {r.split for r in records if r.body_part == "wrist"} == {"test"}
    assert all(r.path.is_file() and r.is_xray for r in records)


def test_folder_per_class_layouts(tmp_path):
    for index in range(6):
        write_image(tmp_path / "flat" / "ankle" / f"study{index}" / "a.png", index)
        write_image(tmp_path / "flat" / "natural_photo" / f"n{index}.jpg", index)
    for split in ("train", "val", "test"):
        write_image(tmp_path / "split" / split / "spine" / "s.png", 3)
    flat = load_folder_tree(tmp_path / "flat")
    assert {r.body_part for r in flat if r.is_xray} == {"ankle"}
    assert {r.kind for r in flat if not r.is_xray} == {"natural_photo"}
    assert {r.split for r in load_folder_tree(tmp_path / "split")} == {"train", "val", "test"}


def test_pack_manifest_and_body_part_task(pack):
    records = load_manifest(pack / "manifest.csv")
    assert all(r.path.is_file() for r in records[:50])
    task = make_task("body_part", records, min_count=30)
    assert "chest" in task.labels and "hand" in task.labels
    assert "wrist" not in task.labels  # 7 train images: below the minimum count
    chest = [r for r in records if r.body_part == "chest"]
    assert len(chest[0].chest_labels) == 14


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    """A manifest in the pack's format: bright 'radiographs' (hand, chest) and dark 'photos'."""
    def film(split, index, path):
        part, xray = ("chest", "hand")[index % 2], index % 3 != 0
        write_image(path, hash((split, index)) % 1000, bright=xray)
        return xray, part, [int((index + j) % 4 == 0) for j in range(14)] if xray and part == "chest" else None

    return write_tiny_pack(tmp_path_factory.mktemp("pack"), {"train": 12, "val": 6, "test": 6}, film)


def test_train_resume_export_evaluate_gate(tiny_pack, tmp_path):
    run = tmp_path / "run"
    common = ["train", "--task", "gate", "--manifest", str(tiny_pack), "--out", str(run), "--size", "32",
              "--batch-size", "4", "--epoch-size", "8"]
    run_training(*common, "--epochs", "1")
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 0 and len(state["history"]) == 1
    run_training(*common, "--epochs", "2")  # resumes: one more epoch, not two
    state = json.loads((run / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]

    model = tmp_path / "models" / "gate"
    run_training("export", "--run", str(run), "--out", str(model), "--manifest", str(tiny_pack))
    card = json.loads((model / "card.json").read_text())
    assert card["role"] == "gate" and card["positive_label"] == "xray"
    assert "Youden" in card["threshold_method"] and card["metrics"]["test"]["n"] == 6
    assert card["training"]["recipe"]["optimizer"] == "adam" and card["training"]["epochs_run"] == 2

    out = tmp_path / "eval.json"
    run_training("evaluate", "--model", str(model), "--manifest", str(tiny_pack), "--split", "test",
                 "--json", str(out), "--plots", str(tmp_path / "plots"))
    report = json.loads(out.read_text())
    assert {"n", "accuracy", "per_class", "confusion"} <= report.keys()
    assert report["n"] == 6 and 0 <= report["accuracy"] <= 1
    assert (tmp_path / "plots" / "gate_confusion.png").is_file()


def test_gate_trains_with_quarter_turns_and_a_turn_loss(tiny_pack, tmp_path):
    run = tmp_path / "run"
    run_training("train", "--task", "gate", "--manifest", str(tiny_pack), "--out", str(run), "--size", "32",
                 "--batch-size", "4", "--epoch-size", "8", "--epochs", "1", "--quarter-turns", "0.5",
                 "--turn-loss", "1.0")
    model = tmp_path / "models" / "gate"
    run_training("export", "--run", str(run), "--out", str(model), "--manifest", str(tiny_pack))
    card = json.loads((model / "card.json").read_text())
    assert card["training"]["recipe"]["quarter_turns"] == 0.5 and card["training"]["recipe"]["turn_loss"] == 1.0
    assert card["labels"] == ["not_xray", "xray"]  # the turn layer is for training only: not shipped


def test_train_export_evaluate_chest_auc(tiny_pack, tmp_path):
    run = tmp_path / "run"
    run_training("train", "--task", "chest", "--manifest", str(tiny_pack), "--out", str(run), "--size", "32",
                 "--batch-size", "4", "--epochs", "1", "--no-balance")
    model = tmp_path / "models" / "chest"
    run_training("export", "--run", str(run), "--out", str(model), "--manifest", str(tiny_pack))
    out = tmp_path / "eval.json"
    run_training("evaluate", "--model", str(model), "--manifest", str(tiny_pack), "--split", "all",
                 "--json", str(out), "--plots", str(tmp_path / "plots"))
    report = json.loads(out.read_text())
    assert {"n", "auc", "mean_auc", "skipped_labels"} <= report.keys()
    assert set(report["auc"]) | set(report["skipped_labels"]) == set(CHEST_LABELS)
    assert report["mean_auc"] == pytest.approx(np.mean(list(report["auc"].values())))
    card = json.loads((model / "card.json").read_text())
    assert card["role"] == "abnormality" and card["body_part"] == "chest"
    assert set(card["thresholds"]) == set(CHEST_LABELS)
    assert (tmp_path / "plots" / "chest_roc.png").is_file()


def test_missing_imagenet_weights_fail_clearly(tiny_pack, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training", "train", "--task", "gate", "--manifest",
                           str(tiny_pack), "--out", str(tmp_path / "r"), "--imagenet-weights",
                           str(tmp_path / "none.safetensors")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "Refusing to silently train from scratch" in proc.stderr


def test_refused_files_are_dropped_and_counted(tmp_path):
    """A file the intake refuses is not scored (it never reaches the models in the service): evaluate
    and calibrate leave it out and say how many they left out."""
    from model_factory import CHEST_LABELS as LABELS
    from model_factory import make_models_dir

    from training.card.calibrate import calibrate
    from training.data.datasets import load_manifest
    from training.measure.evaluate import evaluate_model

    models = make_models_dir(tmp_path / "models", size=32, operating_points=False)
    rows = []
    for split in ("val", "test"):
        for index in range(6):
            name = f"images/{split}_{index}.png"
            write_image(tmp_path / name, index)
            labels = [int((index + j) % 3 == 0) for j in range(14)] if index % 2 else [0] * 14
            rows.append([name, "nih_cxr14", split, 1, "chest", f"p{index}", 0, "radiograph", *labels])
        (tmp_path / f"images/{split}_refused.png").write_bytes(b"not an image")
        rows.append([f"images/{split}_refused.png", "nih_cxr14", split, 1, "chest", "px", 0, "radiograph", *[1] * 14])
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "split", "is_xray", "body_part", "patient_id", "phone_photo", "kind",
                         *LABELS])
        writer.writerows(rows)
    records = load_manifest(tmp_path / "manifest.csv")

    report = evaluate_model(models / "chest", records, "test", device="cpu", bootstrap_rounds=10)
    assert report["n"] == 6 and report["refused_by_intake"] == 1
    gate = evaluate_model(models / "gate", records, "test", device="cpu")
    assert gate["n"] == 6 and gate["refused_by_intake"] == 1
    card = calibrate(models / "chest", records, "tiny", cache=None, bootstrap_rounds=10)
    assert card.operating_points.method["refused_by_intake"] == {"val": 1, "test": 1}
    assert card.ece["val"]["n"] == 6


def test_quarter_turns_turn_train_images_and_fix_one_turn_per_val_image(tmp_path):
    from training.data.datasets import Record
    from training.data.images import Augment, RecordDataset, quarter_turn

    # An image whose bright block sits in one corner: each quarter turn moves it to another corner.
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[:8, :8] = 255
    image = Image.fromarray(pixels)
    corners = {int(np.argmax([np.asarray(quarter_turn(image, k))[a, b].mean() for a, b in
                              ((slice(0, 8), slice(0, 8)), (slice(0, 8), slice(24, 32)),
                               (slice(24, 32), slice(24, 32)), (slice(24, 32), slice(0, 8)))]))
               for k in range(4)}
    assert corners == {0, 1, 2, 3}

    def upright_share(augment: Augment, draws: int = 200) -> float:
        return float(np.mean([np.asarray(augment(image))[:10, :10].mean() > 100 for _ in range(draws)]))

    plain = Augment(32, flip=False, seed=1)
    plain.geometry = plain.colour = lambda x: x  # only the turns are asked about here
    turned = Augment(32, flip=False, seed=1, quarter_turns=1.0)
    turned.geometry = turned.colour = lambda x: x
    assert upright_share(plain) > 0.95 and upright_share(turned) < 0.05

    film = np.full((128, 128), 40, dtype=np.uint8)  # large enough for the intake
    film[:32, :32] = 255
    records = []
    for i in range(24):
        path = tmp_path / f"film_{i}.png"
        Image.fromarray(film).save(path)
        records.append(Record(path=path, split="val", source="test", kind="radiograph", is_xray=True))
    task = make_task("gate", records)
    val = RecordDataset(records, task, 32, 0.5, 0.25, fixed_turns=True)
    first = [val[i][0].numpy() for i in range(len(records))]
    again = [val[i][0].numpy() for i in range(len(records))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))  # the same turn every time
    upright = [float(x[0, :8, :8].mean()) > 0 for x in first]
    assert 0 < sum(upright) < len(records)  # some images upright, others turned
