"""Convert torchxrayvision's DenseNet-121 chest weights into our card format (safetensors, no pickle after this).

torchxrayvision stores whole pickled model objects and downloads them at run time. Here that happens
once, on a machine with internet, inside torchxrayvision's own loader (a trusted source); what we
ship and load afterwards is safetensors + a card. Its 18 outputs are mapped to our 14 labels (the
untrained ones are empty strings in ``model.targets``), its input contract (1 channel, [-1024, 1024],
224 px) goes into the card, and its ``op_threshs`` become the card's thresholds.
"""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path

import torch

from diagnosis.cards import InputSpec, ModelCard, WeightsSpec, write_card
from diagnosis.network import DenseNetClassifier, save_weights

from ..data.datasets import CHEST_LABELS


def _resolve(weights: str, cache_dir: str | None) -> tuple[str, str | None]:
    """A weights name (e.g. densenet121-res224-nih) or a local file named as torchxrayvision names it."""
    import torchxrayvision as xrv

    if weights in xrv.models.model_urls:
        return weights, cache_dir
    path = Path(weights)
    for name, entry in xrv.models.model_urls.items():
        if name.startswith("densenet") and Path(entry["weights_url"]).name == path.name:
            return name, str(path.parent)
    raise SystemExit(f"unknown torchxrayvision weights {weights!r}: give a densenet121-* name or its file")


def import_torchxrayvision(weights: str, out: Path | str, cache_dir: str | None = None,
                           dtype: torch.dtype = torch.float32) -> ModelCard:
    try:
        import torchxrayvision as xrv
    except ImportError:
        raise SystemExit("pip install torchxrayvision (on a machine with internet) to convert its weights") from None
    name, cache_dir = _resolve(weights, cache_dir)
    source = xrv.models.DenseNet(weights=name, cache_dir=cache_dir)  # torchxrayvision's own (trusted) loader
    targets = list(source.targets)
    labels = [label for label in CHEST_LABELS if label in targets]
    rows = [targets.index(label) for label in labels]
    state = {k: v for k, v in source.state_dict().items() if k.startswith("features.")}
    state["classifier.weight"] = source.classifier.weight.detach()[rows]
    state["classifier.bias"] = source.classifier.bias.detach()[rows]
    network = DenseNetClassifier(len(labels))
    network.load_state_dict(state, strict=True)

    thresholds = {}
    op = getattr(source, "op_threshs", None)
    for label, row in zip(labels, rows, strict=True):
        value = float(op[row]) if op is not None else math.nan
        thresholds[label] = value if math.isfinite(value) else 0.5
    out = Path(out)
    sha, dtype_name = save_weights(network, out, dtype=dtype)
    card = ModelCard(
        name=out.name, version=f"xrv-{xrv.__version__}-{date.today().isoformat()}", role="abnormality",
        body_part="chest", labels=labels, activation="sigmoid",
        input=InputSpec(size=224, mean=0.5, std=1 / 2048,
                        description="torchxrayvision contract: 1 channel, (pixel/255)·2048 − 1024, 224 px"),
        thresholds=thresholds, threshold_method=f"torchxrayvision op_threshs of {name}",
        data_sources=[{"source": "torchxrayvision " + name, "licence": "Apache-2.0 (code and weights); "
                       "training data licences per torchxrayvision's documentation"}],
        training={"imported_from": f"torchxrayvision {xrv.__version__} weights {name}",
                  "weights_url": xrv.models.model_urls[name]["weights_url"],
                  "outputs_mapped": {label: targets[row] for label, row in zip(labels, rows, strict=True)}},
        metrics={"note": "measure on your data: python -m training evaluate --model <this folder> --manifest CSV"},
        weights=WeightsSpec(sha256=sha, dtype=dtype_name),
    )
    write_card(out, card)
    return card
