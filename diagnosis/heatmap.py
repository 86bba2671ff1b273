"""Module IV: where the model looked.

For DenseNet-121's global-average-pool + linear head, Grad-CAM on the final post-ReLU feature map
reduces to CAM: the gradient of logit c w.r.t. A_k(i, j) is W[c, k] / (H·W) everywhere, so
Grad-CAM = ReLU(Σ_k W[c,k]·A_k) up to a positive scale. ``class_activation_map`` computes it from
the features of the same forward pass (no backward pass); ``grad_cam`` is pytorch-grad-cam's
GradCAM on the same layer and serves as the reference (and as a setting, ``heatmap="gradcam"``).
"""

from __future__ import annotations

import numpy as np
import torch

from .network import DenseNetClassifier


def normalise_map(cam: np.ndarray) -> np.ndarray:
    """Same normalisation as pytorch-grad-cam's ``scale_cam_image``: shift to 0, divide by max."""
    cam = cam - cam.min()
    return (cam / (1e-7 + cam.max())).astype(np.float32)


def class_activation_map(class_weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """ReLU(Σ_k W[c,k]·A_k) at feature-map resolution, normalised to [0, 1].

    class_weights: the classifier row W[c] (K,); features: one image's post-ReLU map (K, h, w)."""
    cam = np.tensordot(class_weights.astype(np.float32), features.astype(np.float32), axes=(0, 0))
    return normalise_map(np.maximum(cam, 0.0))


def grad_cam(model: DenseNetClassifier, input_tensor: torch.Tensor, class_index: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM on the post-ReLU map (``model.relu``), at input resolution, in [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # Grad-CAM needs autograd: leave inference mode, and clone so the input is a normal tensor.
    with torch.inference_mode(False), torch.enable_grad():
        input_tensor = input_tensor.float().clone()
        with GradCAM(model=model, target_layers=[model.relu]) as cam:
            return cam(input_tensor=input_tensor, targets=[ClassifierOutputTarget(class_index)])[0]
