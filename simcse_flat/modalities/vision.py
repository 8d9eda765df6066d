"""The vision modality (SimCLR / FlatCLR): its settings and the object the registry holds; the parts themselves are
in :mod:`simcse_flat.vision`, imported (with torchvision) only when a vision run is checked or built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config_checks import check_choice, check_range
from ..errors import ConfigError
from .base import Modality

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig
    from ..export import RunSummary
    from .parts import TrainingParts


@dataclass
class VisionArguments:
    """The vision modality's settings (SimCLR / FlatCLR): the images, their augmentation, the ResNet and its head."""

    _argument_group_name = "vision (read only with --modality vision)"

    vision_dataset: str = field(
        default="fashion_mnist", metadata={"help": "cifar10 | cifar100 | stl10 | fashion_mnist | imagefolder"}
    )
    data_root: str = field(
        default="data/vision",
        metadata={"help": "torchvision root; for fashion_mnist also a folder of the four IDX .gz files."},
    )
    download: bool = field(default=False, metadata={"help": "Let torchvision download the data set (needs network)."})
    image_size: int | None = field(default=None, metadata={"help": "Crop size in pixels; unset: the data set's own."})
    min_crop_scale: float = field(default=0.08, metadata={"help": "Smallest area fraction of the random crop."})
    color_jitter_strength: float = field(default=0.5, metadata={"help": "SimCLR's s: 0.5 on CIFAR, 1.0 on ImageNet."})
    arch: str = field(default="resnet18", metadata={"help": "resnet18 | resnet34 | resnet50 (torchvision, untrained)."})
    cifar_stem: bool = field(default=True, metadata={"help": "3x3 stride-1 first conv, no max-pool (small images)."})
    norm_layer: str = field(
        default="batch",
        metadata={"help": "batch (SimCLR) | group (GroupNorm 32, EMC²'s code) | none: group or none keep each "
                  "sample's embedding independent of its batch, as EMC²'s per-sample chains assume."},
    )
    projection_hidden_dim: int | None = field(default=None, metadata={"help": "Head's hidden width; unset: features'."})
    projection_dim: int = field(default=128, metadata={"help": "Output of the projection head (the loss's space)."})


class VisionModality(Modality):
    """Images from torchvision data sets, two SimCLR views each, a ResNet, kNN accuracy while training."""

    name = "vision"
    settings = VisionArguments

    def check(self, config: RunConfig) -> None:
        if config.training.gradient_checkpointing:
            raise ConfigError("gradient_checkpointing applies to text models (transformers layers); the vision "
                              "model has none: set gradient_checkpointing: false")
        try:
            from ..data.vision import DATASETS
            from ..models.vision import ARCHS, NORM_LAYERS
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("torchvision"):
                raise
            raise ConfigError("modality vision needs torchvision: pip install 'simcse_flat[vision]'") from err
        vision = config.settings
        check_choice("vision_dataset", vision.vision_dataset, tuple(DATASETS))
        check_choice("arch", vision.arch, ARCHS)
        check_choice("norm_layer", vision.norm_layer, NORM_LAYERS)
        check_range("min_crop_scale", vision.min_crop_scale, low=0.0, high=1.0)
        check_range("color_jitter_strength", vision.color_jitter_strength, low=0.0, inclusive=True)
        sizes = {"image_size": vision.image_size, "projection_dim": vision.projection_dim,
                 "projection_hidden_dim": vision.projection_hidden_dim}  # fmt: skip
        for key, value in sizes.items():
            if value is not None:
                check_range(key, value, low=1, inclusive=True)
        if config.training.grad_cache_chunk_size and vision.norm_layer == "batch":
            raise ConfigError(
                "grad_cache_chunk_size needs an encoder whose rows do not mix: batch norm would see chunk statistics "
                "and update its running statistics twice; set norm_layer: group (or none)"
            )

    def build(self, config: RunConfig, evaluate: bool = True) -> TrainingParts:
        from ..vision import vision_parts

        return vision_parts(config, evaluate)

    def evaluator(self, config: RunConfig) -> Callable[[nn.Module], dict]:
        from ..vision import knn_evaluator

        return knn_evaluator(config)

    def primary_metric(self, config: RunConfig) -> str:
        return "knn_accuracy"

    def export(self, model: nn.Module, folder: str | Path, overwrite: bool = False,
               summary: RunSummary | None = None) -> Path:  # fmt: skip
        from ..vision import export_vision_model

        return export_vision_model(model, folder, overwrite, summary)

    def final_scores(self, config: RunConfig, model: Path, probe: dict, test_tasks: list | None) -> dict:
        """Linear probe and kNN accuracy of the ``model`` folder (``probe``: how many labelled images)."""
        from ..vision import linear_probe_scores

        return linear_probe_scores(config, model, **probe)

    def untrained_scores(self, config: RunConfig, probe: dict) -> dict | None:
        """The same architecture at random init, probed as :meth:`final_scores` probes a trained one."""
        from ..vision import linear_probe_scores

        return linear_probe_scores(config, None, **probe)
