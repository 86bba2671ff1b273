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
