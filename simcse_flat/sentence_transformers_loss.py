"""simcse_flat's losses inside sentence-transformers' own trainer.

For users who already train with ``SentenceTransformerTrainer`` and want FlatNCE (or DCL, or InfoNCE at a
temperature) without leaving it::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from simcse_flat.sentence_transformers_loss import SimcseFlatLoss

    model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    loss = SimcseFlatLoss(model, "flatnce", temperature=0.05)
    SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss).train()

The columns are those of ``MultipleNegativesRankingLoss``: ``(anchor, positive)`` or ``(anchor, positive,
negative)``. Each anchor is scored against every positive and every negative of the batch, gathered from every
process with gradient; its own negative is its hard negative (``hard_negative_weight``). For SimCSE's unsupervised
objective give each sentence as both anchor and positive: the two forward passes draw different dropout masks.
InfoNCE at temperature τ is ``MultipleNegativesRankingLoss(scale=1/τ)`` exactly
(``tests/test_sentence_transformers_loss.py``).

sentence-transformers' trainer runs the processes and does not tell the loss which one it is in, so a loss built
here by name takes its rank and world size from the process group each time it is called (a loss given as an
instance, or ``rank`` / ``world_size`` given as settings, is used as it is).

EMC² and SogCLR are not offered here: they keep state per training example, indexed by its position in the data set,
which sentence-transformers' trainer does not pass to a loss. ``train.py`` runs them.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .losses import ContrastiveLoss, loss_class
from .views import contrastive_loss_on_views


class SimcseFlatLoss(nn.Module):
    """A simcse_flat loss with sentence-transformers' loss interface.

    Args:
        model: the ``SentenceTransformer`` being trained.
        loss: a loss name (``infonce``, ``flatnce``, ``dcl``) or a :class:`ContrastiveLoss` instance.
        **loss_kwargs: the loss's hyper-parameters (``temperature``, ``hard_negative_weight``, ...), with a name.
    """

    def __init__(self, model: nn.Module, loss: str | ContrastiveLoss = "flatnce", **loss_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        cls = type(loss) if isinstance(loss, ContrastiveLoss) else loss_class(loss)
        if getattr(cls, "needs_dataset_size", False):
            raise ValueError(
                f"loss {cls.name!r} keeps per-example state indexed by data-set position, which "
                "sentence-transformers' trainer does not give a loss; train it with train.py"
            )
        self.loss_fn = loss if isinstance(loss, ContrastiveLoss) else cls(**loss_kwargs)
        # asked at the call, not here: the process group may start only after the loss is built (with the trainer)
        told = isinstance(loss, ContrastiveLoss) or "rank" in loss_kwargs or "world_size" in loss_kwargs
        self.rank_from_process_group = not told

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """``embeddings``: one ``(B, D)`` tensor per column (anchor, positive[, negative]); ``labels`` are unused."""
        if len(embeddings) not in (2, 3):
            raise ValueError(f"expected 2 columns (anchor, positive) or 3 (+ negative), got {len(embeddings)}")
        batch = embeddings[0].size(0)
        # the trainer's own path: columns are views, stacked view-major; sample ids only name rows (no state here)
        sample_ids = torch.arange(batch, device=embeddings[0].device)
        if self.rank_from_process_group:
            self.loss_fn.rank, self.loss_fn.world_size = distributed.rank(), distributed.world_size()
        loss, _ = contrastive_loss_on_views(self.loss_fn, torch.cat(embeddings), sample_ids)
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return self.loss_fn.get_config_dict()

    @property
    def citation(self) -> str:
        return self.loss_fn.citation
