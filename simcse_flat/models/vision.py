"""A torchvision ResNet plus SimCLR's projection head: images in, one projection per image out.

::

    pixel_values (V*B, C, H, W) ─▶ ResNet, no classifier ─▶ h (V*B, F) ─▶ head ─▶ z (V*B, D) ─▶ loss
                                                            └─ encode(): what linear evaluation reads

The loss sees ``z``; downstream tasks read ``h``, the representation before the head, which transfers better
(SimCLR, Chen et al., 2020, section 4.2). A saved model is a folder with ``vision_config.json`` (everything needed to
rebuild the module) and ``model.safetensors``; :meth:`VisionEncoder.from_pretrained` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torchvision
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..run_folder import write_folder_atomically

ARCHS = ("resnet18", "resnet34", "resnet50")
NORM_LAYERS = ("batch", "group", "none")
GROUP_NORM_GROUPS = 32  # EMC²'s code: GroupNorm(32, C) in place of every BatchNorm of a ResNet
CONFIG_FILE = "vision_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class VisionModelConfig:
    """The architecture, plus what evaluation needs to feed it like training did."""

    arch: str = "resnet18"
    cifar_stem: bool = True  # 3x3 stride-1 first conv and no max-pool: keeps 32 px images at 32 px into layer1
    norm_layer: str = "batch"  # batch (SimCLR) | group | none (EMC²'s code): see norm_layer_factory
    in_channels: int = 3
    projection_hidden_dim: int | None = None  # None: the feature dimension (512 for ResNet-18, 2048 for ResNet-50)
    projection_dim: int = 128
    image_size: int = 32  # the training crop; evaluation resizes to it
    dataset: str | None = None  # what it was trained on (a key of simcse_flat.data.vision.DATASETS)


def norm_layer_factory(kind: str, spatial: bool = True) -> Callable[[int], nn.Module]:
    """``channels -> module`` for every normalisation of the encoder (``spatial``: ``(N, C, H, W)`` inputs) and of
    its head (``(N, C)``).

    ``batch`` is SimCLR's choice. Batch norm makes a sample's embedding depend on the rest of its batch, which
    suits a loss over one batch but not EMC²'s per-sample chains: a chain negative re-encoded in its own forward
    pass is normalised with other statistics than the batch it is scored against. EMC²'s code therefore replaces
    every batch norm of a ResNet with ``GroupNorm(32, C)`` (``group``), or removes it (``none``, its
    ``--disable_batchnorm``); with either, each sample's embedding depends on that sample alone.
    """
    if kind == "batch":
        return nn.BatchNorm2d if spatial else nn.BatchNorm1d
    if kind == "group":
        return lambda channels: nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    if kind == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {kind!r}")


def build_backbone(arch: str, cifar_stem: bool, in_channels: int, norm_layer: str = "batch") -> tuple[nn.Module, int]:
    """An untrained torchvision ResNet with its classifier removed, and the width of its output."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer_factory(norm_layer))
    if cifar_stem:  # SimCLR's CIFAR variant: a 7x7/2 conv and a max-pool would shrink 32 px to 8 px at once
        net.conv1 = _stem_conv(in_channels, kernel_size=3, stride=1)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = _stem_conv(in_channels, kernel_size=7, stride=2)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _stem_conv(in_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, 64, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits its own
    return conv


class ProjectionHead(nn.Sequential):
    """SimCLR's 2-layer MLP ``z = W2 ReLU(BN(W1 h))`` (batch norm in the hidden layer, as in SimCLR's code; the
    encoder's ``norm_layer`` in its place otherwise)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm_layer: str = "batch") -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            norm_layer_factory(norm_layer, spatial=False)(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class VisionEncoder(nn.Module):
    """ResNet + projection head. ``forward`` gives the projection the loss scores; ``encode`` the representation."""

    def __init__(self, config: VisionModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone, self.feature_dim = build_backbone(
            config.arch, config.cifar_stem, config.in_channels, config.norm_layer
        )
        hidden = config.projection_hidden_dim or self.feature_dim
        self.head = ProjectionHead(self.feature_dim, hidden, config.projection_dim, config.norm_layer)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``(V*B, C, H, W)`` → ``(V*B, projection_dim)``."""
        return self.head(self.backbone(pixel_values))

    def encode(self, pixel_values: Tensor) -> Tensor:
        """``(N, C, H, W)`` → ``(N, feature_dim)``: the representation before the head, for downstream tasks."""
        return self.backbone(pixel_values)

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``vision_config.json`` and ``model.safetensors`` to ``path`` atomically; ``path`` must be new, empty,
        or (with ``overwrite``) an earlier export of ours."""
        with write_folder_atomically(path, overwrite) as folder:
            (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
            weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(weights, str(folder / WEIGHTS_FILE))
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VisionEncoder":
        """Rebuild a model written by :meth:`save_pretrained`."""
        path = Path(path)
        config = VisionModelConfig(**json.loads((path / CONFIG_FILE).read_text()))
        return cls(config).load_weights(path / WEIGHTS_FILE)

    def load_weights(self, weights_file: str | Path) -> "VisionEncoder":
        """Load a ``safetensors`` state dict (ours or ``accelerate.save_state``'s); every key must match."""
        self.load_state_dict(load_file(str(weights_file)))
        return self
