"""torchxrayvision → our card: same outputs as torchxrayvision on the same image (offline, random weights)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnosis.backends import TorchRunner
from diagnosis.network import load_model
from diagnosis.pipeline import LoadedModel

xrv = pytest.importorskip("torchxrayvision")
NAME = "densenet121-res224-nih"


@pytest.fixture(scope="module")
def xrv_weights(tmp_path_factory) -> Path:
    """A random xrv DenseNet saved exactly as torchxrayvision stores its downloads (a pickled model)."""
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None, num_classes=18)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.classifier.weight.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("xrv_cache")
    path = folder / Path(xrv.models.model_urls[NAME]["weights_url"]).name
    torch.save(model, path)  # test-only: torchxrayvision's own on-disk format is a pickle
    return path


def test_converted_model_matches_torchxrayvision(xrv_weights, tmp_path):
    from conftest import ROOT

    out = tmp_path / "chest_xrv"
    proc = subprocess.run([sys.executable, "-m", "training", "import-torchxrayvision", "--weights", NAME,
                           "--cache-dir", str(xrv_weights.parent), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    card, network = load_model(out)
    assert card.input.size == 224 and len(card.labels) == 14 and card.role == "abnormality"
    ops = xrv.models.model_urls[NAME]["op_threshs"]
    targets = xrv.models.model_urls[NAME]["labels"]
    assert card.thresholds["Effusion"] == pytest.approx(ops[targets.index("Effusion")])

    reference = xrv.models.DenseNet(weights=NAME, cache_dir=str(xrv_weights.parent), apply_sigmoid=True)
    reference.op_threshs = None  # raw sigmoid outputs, as our card reports them
    rng = np.random.default_rng(1)
    for _ in range(2):
        gray = rng.integers(0, 256, (224, 224), dtype=np.uint8)
        with torch.no_grad():
            expected = reference(torch.from_numpy(xrv.datasets.normalize(gray, 255))[None, None].float())[0]
        ours = LoadedModel(out, card, network, TorchRunner(network, torch.device("cpu")))
        logits, _ = ours.runner(ours.prepare(gray)[None])
        probs = ours.probabilities(logits)[0]
        for label, value in zip(card.labels, probs, strict=True):
            assert value == pytest.approx(float(expected[targets.index(label)]), abs=1e-5)
