"""What differs between training on text and on images, in one small bundle the loop consumes.

The loop in :mod:`simcse_flat.trainer` knows nothing about tokenizers or pixels: it gets a model whose forward maps a
collated batch (minus ``sample_ids``) to ``(V*B, D)`` embeddings, view-major; a data set whose items carry their
index as ``idx``; a collate function; and a way to save the trained model. ``config.model.modality`` picks the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, RunConfig


@dataclass
class TrainingParts:
    model: nn.Module  # forward(**batch) -> (V*B, D) embeddings, view-major
    dataset: Dataset  # items are dicts carrying their data-set index as "idx"
    collate_fn: Callable[[list[dict]], dict]
    # (unwrapped model, folder, overwrite=...): an atomic export; the loop adds card and config
    save_model: Callable[..., object]
    description: str  # one line for the start-of-run summary
    symmetric: bool = False  # also score view 1 against view 0 (SimCLR); SimCSE scores one direction
    negatives: str = "cross_view"  # views.contrastive_loss_on_views: cross_view (SimCSE) | all_views (NT-Xent)
    # one view a state for EMC²'s chain negatives: (examples, which are hard negatives) -> batch of one view;
    # unset: collate_fn, keeping view 1 (or 2)
    collate_positives: Callable[[list[dict], list[bool]], dict] | None = None
    # examples in each source, in data-set order (ids 0..n0-1 are source 0's, ...); unset: one source
    source_sizes: list[int] | None = None


def text_parts(config: RunConfig) -> TrainingParts:
    """SimCSE: a HuggingFace encoder with a pooler, sentences or NLI triples (one or several sources), a
    sentence-transformers folder."""
    from .data.text import ContrastiveCollator, SourcesDataset, load_train_source
    from .export import save_sentence_transformers_folder
    from .models.text import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(
        config.model.model_name_or_path,
        pooler=config.model.pooler,
        mlp_only_train=config.model.mlp_only_train,
    )  # its max_seq_length stays the inference length; the collator truncates training text
    data = config.data
    files = [data.train_file] if isinstance(data.train_file, str) else data.train_file
    sources = [
        load_train_source(file, data.dataset_split, data.max_train_samples, data.dedupe, data.data_cache_dir)
        for file in files
    ]
    collator = ContrastiveCollator(encoder.tokenizer, config.model.max_seq_length)
    dataset = SourcesDataset(sources)
    return TrainingParts(
        model=encoder,
        dataset=dataset,
        collate_fn=collator,
        collate_positives=collator.positives,
        save_model=save_sentence_transformers_folder,
        description="; ".join(_describe(source) for source in sources),
        source_sizes=dataset.sizes,
        negatives=config.loss.negatives or "cross_view",
    )


def _describe(source) -> str:
    kind = "supervised (sent0, sent1, hard_neg)" if source.supervised else "unsupervised (dropout views)"
    notes = "".join(f" ({note})" for note in source.notes)
    return f"{len(source.dataset)} {kind} examples from {source.name}{notes}"


def build_parts(config: RunConfig) -> TrainingParts:
    modality = config.model.modality
    if modality == "text":
        return text_parts(config)
    if modality == "vision":
        from .vision import vision_parts  # torchvision is imported on this path only

        return vision_parts(config)
    raise ConfigError(f"modality must be text or vision, got {modality!r}")
