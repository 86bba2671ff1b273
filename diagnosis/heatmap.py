"""Module IV: where the model looked, and which way each region pushed the estimate.

For DenseNet-121's global-average-pool + linear head the logit of class c is

    z_c = mean_ij( Σ_k W[c,k]·A_k(i,j) ) + b_c

so the signed map ``S_c = Σ_k W[c,k]·A_k`` (A: the final post-ReLU feature map) is an exact
decomposition of the estimate over the image: each cell adds S_c(i,j)/(h·w) to the logit.

* ``class_evidence`` returns S_c before any ReLU, scaled symmetrically to [-1, 1] by its largest
  magnitude. This is what the overlays show (``diagnosis.overlay``): red where a region raised this
  estimate, blue where it lowered it, colour strength ∝ the region's share. Why symmetric and not
  min-max: min-max would paint the least negative region "hot" on a film where every region
  lowered the estimate, i.e. claim evidence that is not there; with zero kept at zero the colour's
  sign is always true, and because the map is divided by its largest |value| the strongest region
  always reaches full colour, so a panel is never blank (only an exactly-zero map would be, see
  ``is_flat``). Zero is a natural reference here: A is post-ReLU, so "0" is "no feature fired".
* ``class_activation_map`` is ReLU(S_c) min-max normalised: Grad-CAM's map. Grad-CAM on this layer
  reduces to it (the gradient of z_c w.r.t. A_k(i,j) is W[c,k]/(h·w) everywhere), which the tests
  check against pytorch-grad-cam's ``GradCAM`` (``grad_cam``, also the ``heatmap="gradcam"``
  reference path). It is blank whenever S_c ≤ 0 everywhere, which is the common case for a
  finding the model does not see (63–70 % of the panels sent before this change were blank).
* ``relative_evidence`` (what the overlays show when the card has a ``heatmap`` section, issue #22):
  ``S_c`` minus the mean of ``S_c`` over normal val films, divided by a fixed per-finding scale.
  The signed map alone is negative almost everywhere for a finding at a low estimate, so it only
  ever said "this lowered the estimate" and pointed nowhere (1 of the 80 pack boxes hit).
  Relative to normal films, red means "here this film raised the estimate more than a typical
  normal film does", and because the scale is fixed (not the film's own maximum) a normal film stays
  faint. The map's mean is exactly the film's logit minus the mean normal film's logit (÷ scale):
  the decomposition still adds up. Figures: docs/heatmaps.md.
* ``block3_gradient_x_activation`` (what the overlays show when the card's ``heatmap`` method is
  "block3_gradient_x_activation_minus_normal_mean", issue #22): the same idea one block earlier, at
  8 × 8 instead of 4 × 4 at 128 px. ``G_c = Σ_k B_k · ∂z_c/∂B_k`` on the block-3 map B (output of
  ``features.transition3.relu``, returned by every runner with ``block3=True``): to first order, how
  much the logit would fall if that cell's block-3 features were switched off. The gradient needs
  only the network's tail (transition 3, block 4, head: ~70 MFLOP at 128 px), run in torch on the
  map any runner returned. Drawn, like the 4 × 4 map, relative to normal films:
  ``(G_c − mean normal G_c) / scale_c``. Unlike ``W_c · A`` the cells do not add up exactly to the
  logit (the tail is not linear). On the 80 pack boxes it points at 24 (the 4 × 4 relative map: 17;
  docs/heatmaps.md).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from .cards import CardError, HeatmapSpec
from .network import DenseNetClassifier

FLAT = 1e-12  # a signed map whose largest |value| is below this has no structure to show


def normalise_map(cam: np.ndarray) -> np.ndarray:
    """Same normalisation as pytorch-grad-cam's ``scale_cam_image``: shift to 0, divide by max."""
    cam = cam - cam.min()
    return (cam / (1e-7 + cam.max())).astype(np.float32)


def signed_map(class_weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Σ_k W[c,k]·A_k at feature-map resolution, no ReLU: each cell's contribution (× h·w) to the logit.

    class_weights: the classifier row W[c] (K,); features: one image's post-ReLU map (K, h, w)."""
    return np.tensordot(class_weights.astype(np.float32), features.astype(np.float32), axes=(0, 0))


def symmetric_scale(cam: np.ndarray) -> np.ndarray:
    """Divide by the largest magnitude: [-1, 1], zero stays zero, the strongest cell reaches ±1."""
    peak = float(np.abs(cam).max()) if cam.size else 0.0
    if peak < FLAT:
        return np.zeros_like(cam, dtype=np.float32)
    return (cam / peak).astype(np.float32)


def class_evidence(class_weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The displayed map: signed class evidence in [-1, 1] (positive raised the estimate)."""
    return symmetric_scale(signed_map(class_weights, features))


BLOCK3_METHOD = "block3_gradient_x_activation_minus_normal_mean"


def block3_gradient_x_activation(network: DenseNetClassifier, block3: np.ndarray,
                                 indices: list[int]) -> np.ndarray:
    """(len(indices), h, w): ``Σ_k B_k · ∂z_c/∂B_k`` for each output index c, on one film's block-3
    map ``block3`` (K, h, w: ``DenseNetClassifier.forward_block3``), through the network's tail only
    (the logit of the image as sent, without the mirror average)."""
    if not indices:
        return np.zeros((0, *block3.shape[1:]), np.float32)
    parameter = next(network.parameters())
    with torch.inference_mode(False), torch.enable_grad():
        # One row per finding, so one backward pass gives every finding's gradient.
        tensor = torch.from_numpy(np.ascontiguousarray(block3)).to(parameter.device, parameter.dtype)
        tensor = tensor[None].repeat(len(indices), 1, 1, 1).requires_grad_(True)
        logits = network.logits_from_block3(tensor)
        chosen = logits[torch.arange(len(indices)), torch.as_tensor(indices)]
        (gradient,) = torch.autograd.grad(chosen.sum(), tensor)
    return (gradient * tensor).sum(dim=1).detach().float().cpu().numpy()


class NormalBaseline:
    """The card's ``heatmap`` arrays: the mean normal-film map per label and the full-colour scale,
    for the card's method (``cards.HeatmapSpec``): 4 × 4 ``W_c · A``, or 8 × 8 block-3 gradient ×
    activation."""

    def __init__(self, folder, spec: HeatmapSpec, labels: list[str]):
        from .openset import load_arrays

        arrays = load_arrays(folder, spec.arrays)
        self.spec, self.mean, self.scale = spec, arrays["mean"].astype(np.float32), arrays["scale"].astype(np.float32)
        if self.mean.ndim != 3 or len(self.mean) != len(labels) or self.scale.shape != (len(labels),):
            raise CardError(f"heatmap arrays do not fit the card's {len(labels)} labels")
        if not np.all(self.scale > 0):
            raise CardError("heatmap scales must be positive")
        self.final = None  # the 4 × 4 map's own mean and scale, when kept beside a block-3 method's
        if "final_mean" in arrays:
            self.final = (arrays["final_mean"].astype(np.float32), arrays["final_scale"].astype(np.float32))

    @property
    def needs_block3(self) -> bool:
        return self.spec.method == BLOCK3_METHOD

    def evidence(self, index: int, class_weights: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The 4 × 4 relative map (method "evidence_minus_normal_mean", or the kept ``final`` arrays)."""
        mean, scale = (self.mean, self.scale) if not self.needs_block3 else (self.final or (None, None))
        if mean is None:
            raise CardError("this heatmap baseline has no 4 × 4 arrays")
        if features.shape[1:] != mean.shape[1:]:
            raise CardError(f"feature map {features.shape[1:]} does not fit the heatmap baseline "
                            f"{mean.shape[1:]} (another input size?)")
        return relative_evidence(class_weights, features, mean[index], float(scale[index]))

    def block3_evidence(self, network: DenseNetClassifier, block3: np.ndarray, indices: list[int],
                        clip: bool = True) -> list[np.ndarray]:
        """The 8 × 8 relative maps of a film's findings ``indices`` (method BLOCK3_METHOD);
        ``clip=False``: before clipping to [-1, 1] (where the hottest point is looked for)."""
        if block3.shape[1:] != self.mean.shape[1:]:
            raise CardError(f"block-3 map {block3.shape[1:]} does not fit the heatmap baseline "
                            f"{self.mean.shape[1:]} (another input size?)")
        maps = block3_gradient_x_activation(network, block3, indices)
        return [relative_map(m, self.mean[i], float(self.scale[i]), clip) for m, i in zip(maps, indices, strict=True)]


def relative_map(signed: np.ndarray, normal_mean: np.ndarray, scale: float, clip: bool = True) -> np.ndarray:
    """(signed − normal mean) / scale, clipped to [-1, 1] unless ``clip`` is False."""
    excess = (signed - normal_mean) / scale
    return (np.clip(excess, -1.0, 1.0) if clip else excess).astype(np.float32)


def relative_evidence(class_weights: np.ndarray, features: np.ndarray, normal_mean: np.ndarray,
                      scale: float) -> np.ndarray:
    """(S_c − mean normal S_c) / scale, clipped to [-1, 1]: red where this film raised the estimate
    more than a typical normal film does. ``scale`` is fixed per finding, so a film close to the
    normal ones stays faint instead of being stretched to full colour."""
    return relative_map(signed_map(class_weights, features), normal_mean, scale)


def without_red(heatmap: np.ndarray) -> np.ndarray:
    """The map with its positive part removed: drawn for a finding that was not flagged, so that the
    overlay never marks an area as evidence of a finding the reply does not report."""
    return np.minimum(heatmap, 0.0).astype(np.float32)


def upsampled(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """The map at ``width`` × ``height`` pixels (bicubic, as the overlay draws it, kept within the
    map's own range: no overshoot)."""
    big = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(big, float(heatmap.min()), float(heatmap.max()))


def hottest_red_point(heatmap: np.ndarray, width: int, height: int) -> tuple[float, float] | None:
    """(x, y) pixel centre of the map's maximum on a ``width`` × ``height`` image the map covers
    (e.g. the model's input), or None when nothing is red (no cell is > 0)."""
    if heatmap.size == 0 or float(heatmap.max()) <= 0:
        return None
    big = upsampled(heatmap, width, height)
    row, column = np.unravel_index(int(np.argmax(big)), big.shape)
    return float(column) + 0.5, float(row) + 0.5


def class_activation_map(class_weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """ReLU(Σ_k W[c,k]·A_k) normalised to [0, 1]: Grad-CAM's map (blank when the evidence is ≤ 0)."""
    return normalise_map(np.maximum(signed_map(class_weights, features), 0.0))


def is_flat(heatmap: np.ndarray, min_range: float = 0.05) -> bool:
    """A map with (almost) nothing to show: its values span less than ``min_range``."""
    return heatmap.size == 0 or float(heatmap.max() - heatmap.min()) < min_range


def grad_cam(model: DenseNetClassifier, input_tensor: torch.Tensor, class_index: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM on the post-ReLU map (``model.relu``), at input resolution, in [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # Grad-CAM needs autograd: leave inference mode, and clone so the input is a normal tensor.
    with torch.inference_mode(False), torch.enable_grad():
        input_tensor = input_tensor.float().clone()
        with GradCAM(model=model, target_layers=[model.relu]) as cam:
            return cam(input_tensor=input_tensor, targets=[ClassifierOutputTarget(class_index)])[0]
