"""What a modality builds for the loop: the parts the loop in :mod:`simcse_flat.trainer` consumes, text or images alike.

The loop knows nothing about tokenizers or pixels: it gets a model whose forward maps a collated batch (minus
``sample_ids`` and ``sample_keys``) to ``(V*B, D)`` embeddings, view-major; a data set whose items carry their index
as ``idx``; a collate function of all views and one of a single view; and the evaluator ``eval_steps`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass
class TrainingParts:
    model: nn.Module  # forward(**batch) -> (V*B, D) embeddings, view-major
    dataset: Dataset  # items are dicts carrying their data-set index as "idx"
    collate_fn: Callable[[list[dict]], dict]
    # one view of each example: (examples, whether each is wanted as its hard negative) -> a batch of that view
    collate_positives: Callable[[list[dict], list[bool]], dict]
    description: str  # one line for the start-of-run summary
    symmetric: bool = False  # also score view 1 against view 0 (SimCLR); SimCSE scores one direction
    negatives: str = "cross_view"  # views.contrastive_loss_on_views: cross_view (SimCSE) | all_views (NT-Xent)
    # what eval_steps runs (model -> results with "primary_metric"); None when eval_steps is 0
    evaluator: Callable[[nn.Module], dict] | None = None
    # examples in each source, in data-set order (ids 0..n0-1 are source 0's, ...); unset: one source
    source_sizes: list[int] | None = None
    base_model: str | None = None  # the hub id the run starts from, for the cards (None: a folder, or from scratch)

    def sample_encoder(self, encode: Callable[[dict], Tensor], device) -> Callable[[Tensor], Tensor]:
        """Embeds data-set samples by *state* with ``encode`` (the loop's forward, with gradient): state ``j < m`` is
        sample ``j``'s positive view, ``m + j`` its hard negative (supervised data). A loss that needs samples
        outside the batch (EMC²'s chain negatives) asks for it through ``inputs_for_step``; no other loss calls it."""

        def encode_samples(states: Tensor) -> Tensor:
            size = len(self.dataset)
            examples = [self.dataset[i] for i in (states % size).tolist()]
            batch = self.collate_positives(examples, (states >= size).tolist())
            return encode({k: v.to(device) for k, v in batch.items()})

        return encode_samples
