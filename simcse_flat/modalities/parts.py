"""What a modality builds for the loop: the parts the loop in :mod:`simcse_flat.trainer` consumes, text or images alike.

The loop knows nothing about tokenizers or pixels: it gets a model whose forward maps a collated batch (minus
``sample_ids`` and ``sample_keys``) to ``(V*B, D)`` embeddings, view-major; a data set whose items carry their index
as ``idx``; a collate function of all views and one of a single view; and the evaluator ``eval_steps`` runs.
:meth:`TrainingParts.sample_encoder` embeds a :class:`~simcse_flat.samples.SampleRequest` with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..samples import SampleRequest


@dataclass
class TrainingParts:
    model: nn.Module  # forward(**batch) -> (V*B, D) embeddings, view-major
    dataset: Dataset  # items are dicts carrying their data-set index as "idx"
    collate_fn: Callable[[list[dict]], dict]
    # one view of each example: (examples, the view of each: samples.POSITIVE or HARD_NEGATIVE) -> a batch of them
    collate_view: Callable[[list[dict], list[int]], dict]
    description: str  # one line for the start-of-run summary
    symmetric: bool = False  # also score view 1 against view 0 (SimCLR); SimCSE scores one direction
    negatives: str = "cross_view"  # views.contrastive_loss_on_views: cross_view (SimCSE) | all_views (NT-Xent)
    # what eval_steps runs (model -> results with "primary_metric"); None when eval_steps is 0
    evaluator: Callable[[nn.Module], dict] | None = None
    # examples in each source, in data-set order (ids 0..n0-1 are source 0's, ...); unset: one source
    source_sizes: list[int] | None = None
    base_model: str | None = None  # the hub id the run starts from, for the cards (None: a folder, or from scratch)

    def sample_encoder(self, encode: Callable[[dict], Tensor], device) -> SampleEncoder:
        """The ``encode_samples`` a loss that needs samples outside the batch (EMC²'s chain negatives) gets through
        ``inputs_for_step``: ``encode`` (the loop's forward, with gradient) of each requested sample's view."""
        return SampleEncoder(self.dataset, self.collate_view, encode, device)


@dataclass
class SampleEncoder:
    """Embeds a :class:`~simcse_flat.samples.SampleRequest`: each sample's view, fetched from the data set (on the
    host: the request's one read), collated by the modality, encoded with gradient."""

    dataset: Dataset
    collate_view: Callable[[list[dict], list[int]], dict]
    encode: Callable[[dict], Tensor]
    device: torch.device | str

    def __call__(self, request: SampleRequest) -> Tensor:
        ids, views = torch.stack([request.ids, request.view]).tolist()
        batch = self.collate_view([self.dataset[i] for i in ids], views)
        return self.encode({k: v.to(self.device) for k, v in batch.items()})
