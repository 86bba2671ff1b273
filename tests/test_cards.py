import json
import shutil

import pytest
from conftest import ROOT
from model_factory import make_model

from diagnosis.cards import CardError, read_card
from diagnosis.network import load_model


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "gate"
    make_model(folder, role="gate", labels=["not_xray", "xray"], activation="softmax", biases=[0, 0],
               positive_label="xray", size=32)
    return folder


def test_valid_card_loads(model_folder):
    card, network = load_model(model_folder)
    assert card.labels == ["not_xray", "xray"]
    assert network.classifier.out_features == 2


def test_tampered_weights_are_refused(model_folder):
    weights = model_folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CardError, match="sha256 mismatch"):
        load_model(model_folder)


def test_label_count_mismatch_is_refused(model_folder):
    card = json.loads((model_folder / "card.json").read_text())
    card["labels"] = ["not_xray", "xray", "maybe"]
    (model_folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="label count mismatch"):
        load_model(model_folder)


def test_missing_weights_are_refused(model_folder):
    (model_folder / "weights.safetensors").unlink()
    with pytest.raises(CardError, match="missing"):
        read_card(model_folder)


def test_invalid_card_is_refused(model_folder, tmp_path):
    card = json.loads((model_folder / "card.json").read_text())
    card["positive_label"] = "banana"
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match="positive_label"):
        read_card(broken)


def test_no_pickle_loader_is_used():
    files = sorted((ROOT / "diagnosis").glob("*.py")) + sorted((ROOT / "training").rglob("*.py"))
    assert len(files) > 20  # found from the repository, wherever the tests run from
    source = "\n".join(p.read_text() for p in files)
    assert "torch.load(" not in source and "import pickle" not in source
