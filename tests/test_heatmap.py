"""The forward-only CAM equals pytorch-grad-cam's GradCAM on the same layer.

DenseNet ends in global average pooling and one linear layer, so the gradient of a class score
with respect to the last feature map is that class's weights over the map's area: Grad-CAM's
channel weights are the classifier weights divided by that area, and the forward pass alone gives
the same map up to that constant factor (removed when the map is normalised)."""

import numpy as np
import pytest
import torch
from model_factory import CHEST_LABELS, make_model

from diagnosis.heatmap import class_activation_map, grad_cam, normalise_map
from diagnosis.network import load_model


@pytest.fixture(scope="module")
def chest_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "chest"
    make_model(folder, role="abnormality", body_part="chest", labels=CHEST_LABELS, activation="sigmoid",
               biases=[0.0] * 14, size=96, seed=3)
    _, network = load_model(folder)
    with torch.no_grad():  # trained-looking head: CAMs with structure for several classes
        network.classifier.weight.copy_(torch.randn_like(network.classifier.weight) * 0.05)
    return network


def _upsample_like_grad_cam(cam: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return normalise_map(cv2.resize(cam, (size, size)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cam_equals_grad_cam(chest_model, seed):
    torch.manual_seed(seed)
    image = torch.randn(1, 1, 96, 96)
    with torch.inference_mode():
        features = chest_model.forward_features(image)
    compared = 0
    for label in (0, 2, 5, 9, 13):
        reference = grad_cam(chest_model, image.clone(), label)
        weights = chest_model.classifier.weight[label].detach().numpy()
        ours = _upsample_like_grad_cam(class_activation_map(weights, features[0].numpy()), 96)
        assert np.abs(reference - ours).max() <= 1e-4
        compared += reference.max() > 0
    assert compared >= 3  # not a comparison of empty maps


def test_relu_target_is_post_relu(chest_model):
    features = chest_model.forward_features(torch.randn(1, 1, 96, 96))
    assert features.min() >= 0


# --------------------------------------------------------------------------- the displayed map
def test_evidence_is_the_signed_map_scaled_by_its_largest_magnitude(chest_model):
    from diagnosis.heatmap import class_evidence, signed_map

    features = chest_model.forward_features(torch.randn(1, 1, 96, 96))[0].detach().numpy()
    for label in range(14):
        weights = chest_model.classifier.weight[label].detach().numpy()
        raw = signed_map(weights, features)
        shown = class_evidence(weights, features)
        assert np.abs(shown).max() == pytest.approx(1.0)  # the strongest cell reaches full colour
        assert np.array_equal(np.sign(shown), np.sign(raw))  # the sign (red / blue) is never changed
        np.testing.assert_allclose(shown * np.abs(raw).max(), raw, rtol=1e-5, atol=1e-6)
        # The map decomposes the logit: its mean plus the bias is the class score.
        logit = chest_model.classifier(torch.from_numpy(features.mean(axis=(1, 2)))[None])[0, label].item()
        assert raw.mean() + chest_model.classifier.bias[label].item() == pytest.approx(logit, rel=1e-4, abs=1e-4)


def test_negative_evidence_everywhere_is_blank_for_grad_cam_but_not_for_the_displayed_map(chest_model):
    """The case that blanked most panels: every cell lowered the estimate (CAM ≤ 0 → ReLU → 0)."""
    from diagnosis.heatmap import class_evidence, is_flat

    features = np.abs(np.random.default_rng(0).normal(size=(1024, 3, 3))).astype(np.float32)
    weights = -np.abs(np.random.default_rng(1).normal(size=1024)).astype(np.float32)  # all cells < 0
    assert is_flat(class_activation_map(weights, features))  # Grad-CAM's map: nothing to show
    shown = class_evidence(weights, features)
    assert not is_flat(shown) and shown.max() < 0 and shown.min() == pytest.approx(-1.0)


def test_a_zero_map_stays_zero_instead_of_dividing_by_zero():
    from diagnosis.heatmap import class_evidence

    shown = class_evidence(np.zeros(8, np.float32), np.ones((8, 4, 4), np.float32))
    assert shown.shape == (4, 4) and not shown.any() and np.isfinite(shown).all()
