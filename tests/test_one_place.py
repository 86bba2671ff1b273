"""One place per fact: modes, backend names and heatmap kinds are each written once (in contract/) and
imported everywhere else; every backend the settings accept is one the runner factory knows."""

from __future__ import annotations

import re
from typing import get_args

import pytest
from conftest import ROOT

from contract.envelope import MODES, RequestEnvelope
from contract.settings import BACKENDS, HEATMAPS, ServiceSettings
from diagnosis import backends
from diagnosis.config import PipelineConfig

PACKAGES = ("contract", "diagnosis", "bot", "worker", "training", "api", "bench")


def sources() -> dict[str, str]:
    """Every Python file of the service and training packages, found from the repository root
    (not the working directory), by its path relative to the root."""
    return {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize(("name", "words"), [("modes", MODES), ("heatmap kinds", HEATMAPS),
                                             ("backend names", ("onnx", "openvino", "openvino-bf16"))])
def test_each_list_is_written_once(name, words):
    spelled = re.compile(r"""["']""" + r"""["']\s*,\s*["']""".join(map(re.escape, words)) + r"""["']""")
    places = sorted(path for path, text in sources().items() if spelled.search(text))
    assert places == ["contract/envelope.py" if name == "modes" else "contract/settings.py"], places


def test_every_backend_the_settings_accept_can_be_built():
    accepted = get_args(get_args(ServiceSettings.model_fields["BACKEND"].annotation)[0])
    assert set(accepted) == set(BACKENDS) == set(backends.BACKENDS)
    assert "openvino-bf16" in backends.BACKENDS
    for backend in BACKENDS:
        PipelineConfig(backend=backend)  # the configuration takes every name the settings take
    assert set(get_args(RequestEnvelope.model_fields["mode"].annotation)) == set(MODES)
