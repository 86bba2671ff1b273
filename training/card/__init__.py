"""The card room: every step that writes a section of a model card, and which step owns which section.

``export`` builds a card from a training run and owns the sections in ``EXPORT_OWNS``; every other
section is fitted afterwards by its own command (``POST_HOC``) on the exported weights, and export
keeps those of an existing card (a card is built, never clobbered). ``training/train_pack.sh``
replays, after each model's last export, the post-hoc steps of every section its shipped card has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Card fields export writes from the run (and the data given to it); it keeps all the others.
EXPORT_OWNS = frozenset({
    "name", "version", "role", "body_part", "architecture", "labels", "extra_outputs", "activation", "input",
    "thresholds", "threshold_method", "positive_label", "min_confidence", "flip_average", "data_sources",
    "training", "weights",
})  # fmt: skip
# Post-hoc sections → the `python -m training` command that fits them on the exported weights, in recipe order.
POST_HOC = {
    "calibration": "calibrate", "ece": "calibrate", "operating_points": "calibrate",
    "open_set": "open-set", "modality": "modality", "orientation": "orientation",
}  # fmt: skip


def write_arrays(model: Path | str, file: str, arrays: dict[str, np.ndarray]):
    """Save a section's arrays beside the weights (safetensors, float32, C order: scikit-learn's
    ``coef_`` can be Fortran-ordered and safetensors writes the raw buffer); the card's reference
    to them, with their sha256."""
    from safetensors.numpy import save_file

    from diagnosis.cards import AuxiliaryFile, sha256_of

    path = Path(model) / file
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(path))
    path.chmod(0o644)
    return AuxiliaryFile(file=file, sha256=sha256_of(path))
