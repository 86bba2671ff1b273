"""bench.heatmap_candidates (issue #22): its cached block-3 map is the service's, and its block-2
map is what switching a block-2 cell off costs the logit; the top-region centroid peak.

Stand-in models (random weights): nothing here asserts that a map points anywhere."""

import numpy as np
import pytest
import torch
from conftest import encode, gradient
from model_factory import make_models_dir
from PIL import Image
from safetensors.numpy import load_file

from bench.heatmap_candidates import block2_input, extract_fine, top_region_centroid
from diagnosis.heatmap import block3_gradient_x_activation
from diagnosis.network import load_model
from diagnosis.preprocess import to_model_input
from training.features import service_view


def test_extract_fine_gives_the_services_block3_map_and_a_first_order_block2_map(tmp_path):
    card, network = load_model(make_models_dir(tmp_path) / "chest")
    network.eval()
    films = []
    image = gradient(300, 260, texture=True)
    for n, pixels in enumerate((image, np.ascontiguousarray(image[::-1]))):
        path = tmp_path / f"film{n}.jpg"
        path.write_bytes(encode(Image.fromarray(pixels), "JPEG"))
        films.append(path)
    extract_fine(network, card, films, tmp_path / "fine.safetensors")
    cached = load_file(str(tmp_path / "fine.safetensors"))
    labels, size = len(card.labels), card.input.size
    assert cached["gxa3"].shape == (2, labels, size // 16, size // 16)
    assert cached["gxa2"].shape == (2, labels, size // 8, size // 8)
    x = torch.from_numpy(to_model_input(service_view(films[1]), size, card.input.mean, card.input.std))[None]
    with torch.no_grad():
        block3, _ = network.forward_block3(x)
        logits = network.logits_from_block3(block3)  # the image as sent (no mirror average)
    assert not np.allclose(cached["gxa3"][0], cached["gxa3"][1])  # one map per film
    assert np.allclose(cached["logits"][1], logits[0, :labels].numpy(), atol=1e-4)
    own = block3_gradient_x_activation(network, block3[0].numpy(), list(range(labels)))
    assert np.allclose(cached["gxa3"][1], own, atol=1e-4 * max(1.0, float(np.abs(own).max())))
    assert np.all(cached["lc3"][1] >= cached["gxa3"][1] - 1e-5)  # ReLU(g)·A ≥ g·A, A ≥ 0 after the ReLU

    double = network.double()  # float64: the first-order change is far below float32's resolution
    f = double.features

    def tail(b2):
        b3 = f.transition3.relu(f.transition3.norm(f.denseblock3(f.transition2.pool(f.transition2.conv(b2)))))
        return double.logits_from_block3(b3)[0]

    with torch.no_grad():
        b2 = block2_input(double, x.double())
        base = tail(b2)
        eps = 1e-4
        for row, column in ((0, 0), (3, 5), (7, 7)):
            dimmed = b2.clone()
            dimmed[0, :, row, column] *= 1 - eps
            change = tail(dimmed) - base
            for c in (0, 4):
                assert float(change[c]) == pytest.approx(-eps * cached["gxa2"][1, c, row, column], rel=0.02, abs=1e-9)


def test_the_top_region_centroid_is_the_centre_of_the_hottest_blob_and_none_without_red():
    heat = np.full((8, 8), -0.5, np.float32)
    heat[2:4, 5:7] = 1.0  # a 2 × 2 blob: cells 5–6 across, 2–3 down, centre at (6, 3) in cells
    heat[6, 0] = 0.4  # weaker and apart: not part of the top region
    x, y = top_region_centroid(0.5, 64)(heat)
    assert x == pytest.approx(6 * 8, abs=1.5) and y == pytest.approx(3 * 8, abs=1.5)
    assert top_region_centroid(0.5, 64)(np.full((8, 8), -0.2, np.float32)) is None
