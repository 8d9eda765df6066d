"""What differs between training on text and on images, in one small bundle the loop consumes.

The loop in :mod:`simcse_flat.trainer` knows nothing about tokenizers or pixels: it gets a model whose forward maps a
collated batch (minus ``sample_ids``) to ``(V*B, D)`` embeddings, view-major; a data set whose items carry their
index as ``idx``; a collate function; and a way to save the trained model. ``config.model.modality`` picks the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, RunConfig


@dataclass
class TrainingParts:
    model: nn.Module  # forward(**batch) -> (V*B, D) embeddings, view-major
    dataset: Dataset  # items are dicts carrying their data-set index as "idx"
    collate_fn: Callable[[list[dict]], dict]
    save_model: Callable[[nn.Module, Path], object]  # (unwrapped model, folder); the loop adds card and config
    description: str  # one line for the start-of-run summary
    symmetric: bool = False  # also score view 1 against view 0 (SimCLR); SimCSE scores one direction
    negatives: str = "cross_view"  # views.contrastive_loss_on_views: cross_view (SimCSE) | all_views (NT-Xent)
    # the positive view alone, for EMC²'s chain negatives; unset: collate_fn, keeping view 1
    collate_positives: Callable[[list[dict]], dict] | None = None


def text_parts(config: RunConfig) -> TrainingParts:
    """SimCSE: a HuggingFace encoder with a pooler, sentences or NLI triples, a sentence-transformers folder."""
    from .data.text import ContrastiveCollator, IndexedDataset, is_supervised, load_train_dataset
    from .export import save_sentence_transformers_folder
    from .models.text import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(
        config.model.model_name_or_path,
        pooler=config.model.pooler,
        mlp_only_train=config.model.mlp_only_train,
    )  # its max_seq_length stays the inference length; the collator truncates training text
    dataset = load_train_dataset(config.data.train_file, config.data.dataset_split, config.data.max_train_samples)
    kind = "supervised (sent0, sent1, hard_neg)" if is_supervised(dataset) else "unsupervised (dropout views)"
    collator = ContrastiveCollator(encoder.tokenizer, config.model.max_seq_length)
    return TrainingParts(
        model=encoder,
        dataset=IndexedDataset(dataset),
        collate_fn=collator,
        collate_positives=collator.positives,
        save_model=save_sentence_transformers_folder,
        description=f"{len(dataset)} {kind} examples from {config.data.train_file}",
        negatives=config.loss.negatives or "cross_view",
    )


def build_parts(config: RunConfig) -> TrainingParts:
    modality = config.model.modality
    if modality == "text":
        return text_parts(config)
    if modality == "vision":
        from .vision import vision_parts  # torchvision is imported on this path only

        return vision_parts(config)
    raise ConfigError(f"modality must be text or vision, got {modality!r}")
