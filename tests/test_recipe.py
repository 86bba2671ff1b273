"""The recipe replays: training/train_pack.sh, run on a tiny pack with tiny settings, builds cards with
every section the shipped cards have, that load in the pipeline; re-exporting never erases a section."""

from __future__ import annotations

import csv
import json
import re
import shlex

import pytest
from conftest import ROOT
from test_training import write_image

from diagnosis.config import PipelineConfig
from diagnosis.pipeline import Pipeline
from training.__main__ import main
from training.card import EXPORT_OWNS, POST_HOC
from training.data.datasets import CHEST_LABELS

SHIPPED = {"gate": "gate", "body_part": "body_part", "chest": "chest"}  # folder → `train --task`
# Per split: (kind, body part, count); hip has too few train films for the body-part model (min-count 3),
# so it is the open-set check's hold-out part, as the pack's hip and wrist films are.
PACK_ROWS = [("radiograph", "chest", (8, 6, 6)), ("radiograph", "hand", (4, 2, 2)), ("radiograph", "hip", (2, 1, 1)),
             *((kind, "", (2, 1, 1)) for kind in ("ct", "mri", "ultrasound", "dermoscopy", "natural_photo"))]
TINY = {  # the tiny settings of each step; the model folder and manifest come from the recipe
    "train": ["--size", "32", "--batch-size", "4", "--epochs", "1", "--epoch-size", "8", "--min-count", "3"],
    "export": [],
    "calibrate": ["--bootstrap-rounds", "20"],
    "open-set": ["--train-photos", "0", "--val-photos", "0", "--holdout-photos", "0"],
    "modality": [],
    "orientation": [],
    "heatmap-baseline": [],
}


def recipe_steps() -> dict[str, list[str]]:
    """Per shipped model folder: the `python -m training` commands train_pack.sh runs on it after its
    last export (export first), in order."""
    script = (ROOT / "training" / "train_pack.sh").read_text().replace("\\\n", " ")
    steps: dict[str, list[str]] = {name: [] for name in SHIPPED}
    for line in script.splitlines():
        if not line.startswith("$PY -m training "):  # commented-out lines are not the recipe
            continue
        words = shlex.split(line.split("#")[0])
        command = words[3]
        target = next((words[i + 1] for i, w in enumerate(words) if w in ("--model", "--out")), "")
        target = re.sub(r"^\$(CHEST_V1|CHEST_V2)$", "models/chest", target.strip('"'))
        folder = target.removeprefix("models/")
        if folder in steps and command == "export":
            steps[folder] = ["export"]
        elif folder in steps and command in TINY:
            steps[folder].append(command)
    return steps


def shipped_sections(folder: str) -> set[str]:
    card = json.loads((ROOT / "models" / folder / "card.json").read_text())
    return {key for key, value in card.items() if value not in (None, {}, [], "") and key not in EXPORT_OWNS}


@pytest.fixture(scope="module")
def recipe_pack(tmp_path_factory):
    """A manifest in the pack's format: every modality class, three body parts, NIH-labelled chest films."""
    root = tmp_path_factory.mktemp("recipe-pack")
    rows, seed = [], 0
    for kind, part, counts in PACK_ROWS:
        for split, count in zip(("train", "val", "test"), counts, strict=True):
            for index in range(count):
                seed += 1
                name = f"images/{split}_{kind}_{part}_{index}.png"
                xray = kind == "radiograph"
                write_image(root / name, seed, bright=xray)
                labels = ([int((index + j) % 5 == 0) for j in range(14)] if index % 2 else [0] * 14) \
                    if part == "chest" else [""] * 14  # odd: some findings; even: a normal film
                source = "nih_cxr14" if part == "chest" else f"tiny_{kind}"
                rows.append([name, source, split, int(xray), part, f"p{seed}", 0, kind, *labels])
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "split", "is_xray", "body_part", "patient_id", "phone_photo", "kind",
                         *CHEST_LABELS])
        writer.writerows(rows)
    return root / "manifest.csv"


def training(*args: str) -> None:
    """``python -m training ARGS`` in this process (the recipe's dozen steps would spend minutes importing)."""
    assert main(list(args)) == 0, f"python -m training {' '.join(args)}"


def test_the_recipe_runs_every_card_step_of_each_shipped_card():
    steps = recipe_steps()
    for folder in SHIPPED:
        needed = [POST_HOC[s] for s in shipped_sections(folder) if s in POST_HOC]
        assert steps[folder][:1] == ["export"], f"train_pack.sh never exports models/{folder}"
        missing = sorted(set(needed) - set(steps[folder]))
        assert not missing, f"train_pack.sh exports models/{folder} but never runs {missing} after it"


def test_replay_builds_cards_with_every_shipped_section(recipe_pack, tmp_path):
    """Train tiny, then each model's recipe steps (export, then its post-hoc card steps) on the tiny
    pack; every section the shipped card of that role has is there, the pipeline loads the three, and
    exporting again (the recipe exports the chest model three times) keeps every section."""
    models, cache = tmp_path / "models", tmp_path / "cache"
    manifest = ["--manifest", str(recipe_pack)]
    for folder, task in SHIPPED.items():
        run = tmp_path / "runs" / folder
        extra = ["--no-balance"] if task == "chest" else []
        training("train", "--task", task, "--out", str(run), *manifest, *TINY["train"], *extra)
        for step in recipe_steps()[folder]:
            if step == "export":
                training("export", "--run", str(run), "--out", str(models / folder), *manifest)
            else:
                training(step, "--model", str(models / folder), *manifest, "--cache", str(cache / step), *TINY[step])
    before = {}
    for folder in SHIPPED:
        card = json.loads((models / folder / "card.json").read_text())
        have = {key for key, value in card.items() if value not in (None, {}, [], "")}
        assert shipped_sections(folder) <= have, f"{folder}: missing {sorted(shipped_sections(folder) - have)}"
        before[folder] = card
    Pipeline.load(PipelineConfig(models_dir=models, backend="onnx", cache_dir=cache / "onnx"))

    for folder in ("gate", "body_part"):  # a second export of the same run keeps what it does not own
        training("export", "--run", str(tmp_path / "runs" / folder), "--out", str(models / folder), *manifest)
        card = json.loads((models / folder / "card.json").read_text())
        for section in shipped_sections(folder):
            assert card[section] == before[folder][section], f"{folder}: export changed {section}"
    Pipeline.load(PipelineConfig(models_dir=models, backend="onnx", cache_dir=cache / "onnx"))


def test_part_top_trains_only_the_top_and_exports(recipe_pack, tmp_path):
    """`part-top` fine-tunes denseblock4 onwards on cached inputs: the layers below stay exactly as
    they were, the top moves, and the run folder exports to a card the pipeline loads."""
    from safetensors.torch import load_file

    models, manifest = tmp_path / "models", ["--manifest", str(recipe_pack)]
    training("train", "--task", "body_part", "--out", str(tmp_path / "run"), *manifest, *TINY["train"])
    training("export", "--run", str(tmp_path / "run"), "--out", str(models / "body_part"), *manifest)
    training("part-top", "--model", str(models / "body_part"), *manifest, "--cache", str(tmp_path / "cache"),
             "--out", str(tmp_path / "top"), "--epochs", "2", "--epoch-size", "16", "--batch", "4",
             "--chest-train", "4", "--lr", "0.01", "--dropout", "0")
    before = load_file(str(models / "body_part" / "weights.safetensors"))
    after = load_file(str(tmp_path / "top" / "best.safetensors"))
    state = json.loads((tmp_path / "top" / "state.json").read_text())
    assert state["task"]["name"] == "body_part" and len(state["history"]) == 3
    frozen = [k for k in before if k.startswith(("features.conv0", "features.denseblock1", "features.transition3"))]
    assert frozen and all(before[k].float().equal(after[k].float()) for k in frozen)
    if state["epoch"] > 0:  # an epoch beat the start on val: its top is what the run ships
        top = [k for k in before if k.startswith(("features.denseblock4", "classifier"))
               and before[k].is_floating_point()]
        assert any(not before[k].float().allclose(after[k].float(), atol=1e-3) for k in top)
    training("export", "--run", str(tmp_path / "top"), "--out", str(models / "body_part"), *manifest)
    assert json.loads((models / "body_part" / "card.json").read_text())["training"]["initialisation"].startswith(
        "body_part of")


def test_gate_top_trains_only_the_top_at_four_turns_and_exports(recipe_pack, tmp_path):
    """`gate-top` caches the input of denseblock4 for every picture at 0 / 90 / 180 / 270° and fine-tunes
    the gate's top with the orientation question asked of its map: the layers below stay exactly as they
    were, each picture is cached at four turns (a turned picture is not its upright one), and the run
    exports to a gate card."""
    import numpy as np
    from safetensors.torch import load_file

    from diagnosis.network import load_model
    from training.card.orientation import TURNS
    from training.data.datasets import load_sources
    from training.fit.heads import FeatureCache

    models, manifest = tmp_path / "models", ["--manifest", str(recipe_pack)]
    training("train", "--task", "gate", "--out", str(tmp_path / "run"), *manifest, *TINY["train"])
    training("export", "--run", str(tmp_path / "run"), "--out", str(models / "gate"), *manifest)
    training("orientation", "--model", str(models / "gate"), *manifest, "--cache", str(tmp_path / "features"))
    training("gate-top", "--model", str(models / "gate"), *manifest, "--cache", str(tmp_path / "cache"),
             "--out", str(tmp_path / "top"), "--epochs", "2", "--epoch-size", "16", "--batch", "4",
             "--lr", "0.01", "--dropout", "0")
    cache = FeatureCache(models / "gate", tmp_path / "cache")
    film = next(r for r in load_sources([str(recipe_pack)]) if r.is_xray and r.split == "train")
    views = cache.rows([(film, False, turn) for turn in TURNS], "middle").astype("float32")
    assert not any(np.array_equal(views[0], views[k]) for k in (1, 2, 3))
    before = load_file(str(models / "gate" / "weights.safetensors"))
    after = load_file(str(tmp_path / "top" / "best.safetensors"))
    state = json.loads((tmp_path / "top" / "state.json").read_text())
    assert state["task"]["name"] == "gate" and len(state["history"]) == 3
    assert "turn_right" in state["history"][0] and "non_xrays_refused_90" in state["history"][0]
    shipped, matched = state["comparison_val"]["shipped"], state["comparison_val"]["best_same_non_xrays_through"]
    assert sum(matched["non_xrays_accepted_per_turn"].values()) <= sum(shipped["non_xrays_accepted_per_turn"].values())
    frozen = [k for k in before if k.startswith(("features.conv0", "features.denseblock1", "features.transition3"))]
    assert frozen and all(before[k].float().equal(after[k].float()) for k in frozen)
    assert not any(k.startswith("turn") for k in after)  # the turn question is for training only
    if state["epoch"] > 0:
        top = [k for k in before if k.startswith(("features.denseblock4", "classifier"))
               and before[k].is_floating_point()]
        assert any(not before[k].float().allclose(after[k].float(), atol=1e-3) for k in top)
    training("export", "--run", str(tmp_path / "top"), "--out", str(models / "gate"), *manifest)
    card, _ = load_model(models / "gate")
    assert card.training["initialisation"].startswith("gate of") and card.orientation is not None
