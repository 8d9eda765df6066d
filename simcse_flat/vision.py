"""The vision modality (SimCLR / FlatCLR): training parts for the shared loop, and trained encoders read back.

``modality: vision`` (:class:`simcse_flat.modalities.vision.VisionModality`) builds with :func:`vision_parts`: a ResNet with a
projection head, two SimCLR augmentations of each image, and SimCLR's candidate set (``negatives: all_views``:
every view against both views of every other image, 2B-2 negatives, as NT-Xent and FlatCLR). Everything else
(losses, gather, sampler, optimizer, checkpoints) is the text path's.
:func:`load_encoder` and :func:`evaluate_encoder` serve ``scripts/linear_eval.py``; :func:`knn_evaluator` serves
``eval_steps``; :func:`export_vision_model` writes ``best/`` and ``final/`` with their card. torchvision is imported here and below only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml
from torch import nn

from .data.vision import (
    DATASETS,
    MultiViewDataset,
    collate_one_view,
    collate_views,
    labelled_transform,
    load_images,
    simclr_augmentation,
    subset,
)
from .distributed import world_size
from .errors import ModelLoadError
from .evaluation.linear_probe import extract_features, finetune_accuracy, knn_accuracy, probe_scores
from .export import RunSummary
from .modalities import TrainingParts, saved_settings
from .modalities.vision import VisionArguments
from .models.vision import CONFIG_FILE, WEIGHTS_FILE, VisionEncoder, VisionModelConfig
from .run_folder import add_files_to_export

if TYPE_CHECKING:
    from .config import RunConfig

TRANSFER_MODES = ("linear_eval", "finetune")


def model_config(args: VisionArguments) -> VisionModelConfig:
    """The encoder ``args`` describe; the input channels and default size come from the data set."""
    spec = DATASETS[args.vision_dataset]
    return VisionModelConfig(
        arch=args.arch,
        cifar_stem=args.cifar_stem,
        norm_layer=args.norm_layer,
        in_channels=spec.channels,
        projection_hidden_dim=args.projection_hidden_dim,
        projection_dim=args.projection_dim,
        image_size=args.image_size or spec.image_size,
        dataset=args.vision_dataset,
    )


def vision_parts(config: RunConfig, evaluate: bool = True) -> TrainingParts:
    """SimCLR: an untrained ResNet + head, two augmented views per image, a folder with safetensors + json."""
    args = config.settings
    encoder_config = model_config(args)
    images = load_images(args.vision_dataset, args.data_root, "pretrain", args.download)
    images = subset(images, config.data.max_train_samples, seed=config.training.seed)
    augment = simclr_augmentation(
        DATASETS[args.vision_dataset], encoder_config.image_size, args.min_crop_scale, args.color_jitter_strength
    )
    model: nn.Module = VisionEncoder(encoder_config)
    if world_size() > 1 and torch.cuda.is_available():  # SimCLR's global batch norm: statistics over all processes
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # a no-op without batch norms
    stem = ", CIFAR stem" if args.cifar_stem else ""
    stem += "" if args.norm_layer == "batch" else f", {args.norm_layer} norm"
    return TrainingParts(
        model=model,
        dataset=MultiViewDataset(images, augment),
        collate_fn=collate_views,
        collate_view=collate_one_view,
        evaluator=knn_evaluator(config) if evaluate and config.training.eval_steps > 0 else None,
        description=f"{len(images)} {args.vision_dataset} images, 2 views at {encoder_config.image_size} px, "
        f"{args.arch}{stem}",
        symmetric=True,
        negatives=config.loss.negatives or "all_views",  # SimCLR's NT-Xent: 2B-2 negatives
    )


def export_vision_model(model: nn.Module, path: str | Path, overwrite: bool = False,
                        summary: RunSummary | None = None) -> Path:  # fmt: skip
    """``vision_config.json`` + weights (atomically); with ``summary``, a model card (metadata written by
    ``huggingface_hub``'s card classes) and the run's files."""
    model.save_pretrained(path, overwrite)
    if summary is not None:
        add_files_to_export(path, {"README.md": vision_model_card(summary), **summary.files()})
    return Path(path)


def vision_model_card(summary: RunSummary) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    config, loss = summary.config, summary.loss.get("loss", "")
    data = ModelCardData(library_name="pytorch", pipeline_tag="image-feature-extraction",
                         tags=["simclr", "vision", "simcse_flat", str(loss)], datasets=[config.get("vision_dataset")])  # fmt: skip
    results = summary.results or {}
    rows = [f"| encoder | `{config.get('arch')}` (CIFAR stem: {config.get('cifar_stem')}), random init |",
            f"| image size | {config.get('image_size')} |",
            f"| optimizer | `{config.get('optim')}` |",
            f"| training data | `{config.get('vision_dataset')}` |"]  # fmt: skip
    body = [f"# {Path(config.get('output_dir', 'model')).name} (simcse_flat)", "",
            f"An image-embedding model trained with simcse_flat using the **{loss}** contrastive loss.", "",
            "## Usage", "", "```python", "from simcse_flat.vision import load_encoder",
            "encoder = load_encoder('PATH')  # pip install 'simcse_flat[vision]'",
            "features = encoder.encode(images)  # (N, D) representations, taken before the projection head", "```", "",
            *(["## Evaluation", "", *(f"- {k}: {v:.4g}" for k, v in results.items() if isinstance(v, (int, float))), ""]
              if results else []),
            summary.section(rows)]  # fmt: skip
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def linear_probe_scores(config: RunConfig, model: Path | None, max_train: int, max_test: int) -> dict:
    """Linear probe and kNN accuracy of a vision ``model`` folder; ``None``: the same architecture untrained."""
    torch.manual_seed(config.training.seed)
    encoder = VisionEncoder(model_config(config.settings)) if model is None else load_encoder(model)
    args = config.settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = evaluate_encoder(encoder, args.vision_dataset, args.data_root, download=args.download,
                              max_train=max_train, max_test=max_test, device=device)  # fmt: skip
    return {"linear": scores["linear_accuracy"], "knn": scores["knn_accuracy"]}


# ---- trained encoders, read back ------------------------------------------------------------------------------------


def load_encoder(path: str | Path, random_init: bool = False) -> VisionEncoder:
    """A trained encoder from a model folder (``final/``, ``best/``: ``vision_config.json`` + weights) or a training
    checkpoint (``checkpoint-N``: simcse_flat's ``model.safetensors`` + the run's ``config.yaml``).

    ``random_init`` builds the same architecture with fresh weights: the baseline a trained encoder must beat.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        config = VisionModelConfig(**json.loads((path / CONFIG_FILE).read_text()))
    elif (path / "config.yaml").is_file() and (path / WEIGHTS_FILE).is_file():
        config = model_config(_vision_arguments(path / "config.yaml"))
    else:
        raise ModelLoadError(f"{path}: neither a vision model folder ({CONFIG_FILE}) nor a training checkpoint")
    encoder = VisionEncoder(config)
    return encoder if random_init else encoder.load_weights(path / WEIGHTS_FILE)


def _vision_arguments(config_yaml: Path) -> VisionArguments:
    modality, settings = saved_settings(yaml.safe_load(config_yaml.read_text()) or {})
    if not isinstance(settings, VisionArguments):
        raise ModelLoadError(f"{config_yaml}: a {modality.name} run, not a vision one")
    return settings


# ---- evaluation -----------------------------------------------------------------------------------------------------


def labelled_splits(model: VisionModelConfig, dataset: str, data_root: str | Path, download: bool = False,
                    max_train: int | None = None, max_test: int | None = None,
                    augment_train: bool = False):  # fmt: skip
    """The labelled ``train`` and ``test`` splits of ``dataset`` in the size and channels ``model`` takes, and the
    number of classes. ``augment_train`` crops and flips the training images (for fine-tuning)."""
    spec, size, channels = DATASETS[dataset], model.image_size, model.in_channels
    train_transform = labelled_transform(spec, size, channels, augment=augment_train)
    train = load_images(dataset, data_root, "train", download, train_transform)
    test = load_images(dataset, data_root, "test", download, labelled_transform(spec, size, channels))
    return subset(train, max_train), subset(test, max_test), len(train.classes)


def evaluate_encoder(encoder: VisionEncoder, dataset: str, data_root: str | Path, mode: str = "linear_eval",
                     download: bool = False, max_train: int | None = None, max_test: int | None = None,
                     device: str | torch.device = "cpu", finetune_epochs: int = 10) -> dict:  # fmt: skip
    """Score ``encoder`` on ``dataset``: linear probe + kNN on frozen features, or full fine-tuning.

    Returns a flat dict (accuracies in %) with ``primary_metric`` naming the headline number.
    """
    if mode not in TRANSFER_MODES:
        raise ValueError(f"transfer_mode must be one of {TRANSFER_MODES}, got {mode!r}")
    finetune = mode == "finetune"
    train, test, num_classes = labelled_splits(encoder.config, dataset, data_root, download, max_train, max_test,
                                               augment_train=finetune)
    counts = {"train_examples": len(train), "test_examples": len(test)}
    encoder = encoder.to(device)
    if finetune:
        accuracy = finetune_accuracy(encoder, train, test, num_classes, epochs=finetune_epochs, device=device)
        return {"finetune_accuracy": accuracy, "primary_metric": "finetune_accuracy", **counts}
    train_features = extract_features(encoder, train, device=device)
    test_features = extract_features(encoder, test, device=device)
    return {**probe_scores(train_features, test_features), **counts}


def knn_evaluator(config: RunConfig, max_train: int = 10_000, max_test: int = 2_000) -> Callable[[nn.Module], dict]:
    """What ``eval_steps`` runs on a vision model: kNN accuracy (k = 200, τ = 0.1) of up to ``max_test`` test
    images against ``max_train`` labelled training images. Quick, no training; ``best/`` keeps its best.
    Like the kNN monitors of InstDisc and MoCo it reads the test split: a ``best/`` it picks has seen test labels,
    so report the linear probe of ``final/``."""
    args = config.settings
    encoder_config = model_config(args)
    splits = labelled_splits(encoder_config, args.vision_dataset, args.data_root, args.download, max_train, max_test)

    def evaluate(encoder: VisionEncoder) -> dict:
        device = next(encoder.parameters()).device
        train, test = (extract_features(encoder, split, device=device) for split in splits[:2])
        return {"knn_accuracy": knn_accuracy(*train, *test), "primary_metric": "knn_accuracy"}

    return evaluate
