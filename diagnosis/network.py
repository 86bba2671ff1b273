"""DenseNet-121 as used by every module, and safe loading of its weights from a model folder."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import densenet121

from .cards import CardError, ModelCard, read_card, sha256_of


class DenseNetClassifier(nn.Module):
    """torchvision DenseNet-121 with a 1-channel stem and an explicit, *non-in-place* final ReLU.

    torchvision applies ``F.relu(inplace=True)`` after ``features.norm5``, so hooking ``features``
    gives pre- or post-ReLU maps depending on the device (grad-cam issue #147). Here the post-ReLU
    map is the output of ``self.relu``: a stable Grad-CAM target and the CAM feature map.
    Parameter names match torchvision's (``features.*``, ``classifier.*``) so its weights load.
    """

    def __init__(self, num_outputs: int, in_channels: int = 1, flip_average: bool = False):
        super().__init__()
        self.flip_average = flip_average  # test-time augmentation (eval only): see forward_with_features
        backbone = densenet121(weights=None, num_classes=num_outputs)
        if in_channels != 3:
            backbone.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.features = backbone.features
        self.relu = nn.ReLU(inplace=False)
        self.classifier = backbone.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.features(x))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(feature_map, 1).flatten(1)
        return self.classifier(pooled)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the post-ReLU map of ``x``.

        With ``flip_average`` (in eval mode) the logits are the mean over the image and its mirror
        image, computed as one batch; the map, and so the heatmap, stays that of the image as sent.
        """
        if not self.flip_average or self.training:
            features = self.forward_features(x)
            return self.head(features), features
        n = x.shape[0]
        both = self.forward_features(torch.cat([x, x.flip(3)]))
        return (self.head(both[:n]) + self.head(both[n:])) / 2, both[:n]

    def forward_block3(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block-3 map, post-ReLU final map) of ``x``: the same computation as ``forward_features``,
        with the output of ``features.transition3.relu`` kept (block 3 after its transition's
        BatchNorm and ReLU, 1024 channels, 8 × 8 at 128 px: twice the final map's resolution).
        The finer heatmap (``diagnosis.heatmap``, card ``heatmap`` method ``block3_probe``) is read
        from it."""
        features = self.features
        h = x
        for name, module in features.named_children():
            if name == "transition3":
                break
            h = module(h)
        transition = features.transition3
        block3 = transition.relu(transition.norm(h))
        h = features.norm5(features.denseblock4(transition.pool(transition.conv(block3))))
        return block3, self.relu(h)

    def logits_from_block3(self, block3: torch.Tensor) -> torch.Tensor:
        """The logits of an image (as sent, no mirror average) from its block-3 map: the network's
        tail (transition 3, block 4, final ReLU, head), for gradients at block 3."""
        features = self.features
        transition = features.transition3
        return self.head(self.relu(features.norm5(features.denseblock4(transition.pool(transition.conv(block3))))))

    def forward_with_block3(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward_with_features`` plus the block-3 map (``forward_block3``) of the image as sent."""
        if not self.flip_average or self.training:
            block3, features = self.forward_block3(x)
            return self.head(features), features, block3
        n = x.shape[0]
        block3, both = self.forward_block3(torch.cat([x, x.flip(3)]))
        return (self.head(both[:n]) + self.head(both[n:])) / 2, both[:n], block3[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


def build_network(card: ModelCard) -> DenseNetClassifier:
    return DenseNetClassifier(num_outputs=len(card.outputs), in_channels=card.input.channels,
                              flip_average=card.flip_average)


def load_model(folder: Path | str, device: str | torch.device = "cpu") -> tuple[ModelCard, DenseNetClassifier]:
    """Verify the card (sha256, label count vs. network outputs) and load safetensors weights."""
    folder = Path(folder)
    card = read_card(folder, verify=True)
    state = load_file(str(folder / card.weights.file), device="cpu")
    out_features = state.get("classifier.weight")
    if out_features is None:
        raise CardError(f"weights in {folder.name!r} have no classifier.weight")
    if out_features.shape[0] != len(card.outputs):
        raise CardError(
            f"label count mismatch in {folder.name!r}: card lists {len(card.labels)} labels and "
            f"{len(card.extra_outputs)} extra outputs, network has {out_features.shape[0]} outputs; refusing to load"
        )
    model = build_network(card)
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CardError(f"weights in {folder.name!r} do not fit a DenseNet-121: {error}") from None
    model.eval().to(device)
    return card, model


def save_weights(model: nn.Module, folder: Path | str, dtype: torch.dtype = torch.float16) -> tuple[str, str]:
    """Write ``weights.safetensors`` (fp16 by default) and return (sha256, dtype name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        key: (value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu()).contiguous()
        for key, value in model.state_dict().items()
    }
    path = folder / "weights.safetensors"
    save_file(state, str(path))
    return sha256_of(path), str(dtype).removeprefix("torch.")
