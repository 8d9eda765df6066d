"""The contract every contrastive loss of simcse_flat follows.

A loss scores ``B`` anchors against ``N`` candidates (after the cross-process gather, so ``N`` is usually
``world_size * B`` or ``2 * world_size * B`` with hard negatives) and returns ``(loss, metrics)``:

    loss, metrics = loss_fn(anchors, candidates, positive_index,
                            anchor_ids=..., candidate_ids=..., hard_negative_index=..., exclude_index=...)

=====================  ===========  ==========================================================================
argument               shape        meaning
=====================  ===========  ==========================================================================
``anchors``            (B, D)       anchor embeddings of this process (any dtype; the loss works in fp32)
``candidates``         (N, D)       every candidate: positives, in-batch negatives, hard negatives
``positive_index``     (B,)         column of each anchor's positive among the candidates
``anchor_ids``         (B,)         data-set index of each anchor (stateful losses: EMC², SogCLR)
``candidate_ids``      (N,)         data-set index of each candidate (EMC²'s proposals); the hard negative of
                                    a sample, a sentence of its own, has an id of its own (samples.py)
``hard_negative_index``(B,)         column of each anchor's own hard negative (SimCSE's weighted hard negative)
``exclude_index``      (B,)         column that is the anchor itself and must not count (SimCLR's 2N-view loss)
``duplicate_mask``     (B, N) bool  candidates that duplicate the anchor (same content key, another sample): left
                                    out like ``exclude_index``, so a repeated sentence is never its own negative
=====================  ===========  ==========================================================================

Similarities are cosine similarities divided by the temperature, ``s_ij = cos(a_i, c_j) / τ``, computed in fp32
even under bf16/fp16 autocast: at τ = 0.05 a logit spans ±20, and half precision would round away the small
differences FlatNCE exists to keep.

A loss is told which process it runs on by its caller, ``rank`` and ``world_size`` in the constructor (as open_clip's
``ClipLoss``; the trainer passes accelerate's ``process_index`` and ``num_processes``, and the defaults are one
process). It uses them to find its own rows among gathered ones (``rank * B``) and to scale means over every
process's anchors; it never asks the process group. Gathers go through :mod:`simcse_flat.distributed` with this
``world_size``, which raises a ``ValueError`` if the process group has another size.

Every loss reports the InfoNCE value of its own logits (``infonce``) and the positive's top-1 accuracy, so
curves from different losses can be read on one axis.

**A row with no negative left** (every candidate but the positive excluded: a small batch of a corpus with many
copies, where every other sample is a duplicate) has no contrast to learn from: FlatNCE's and DCL's
``logsumexp`` over nothing is ``-inf`` and SogCLR's estimate NaN. Such rows are left out of the step: of the loss
(:meth:`ContrastiveLoss.mean_over_rows`, the mean over the rows of every process that have a negative), of the
shared metrics and of any per-sample state; ``rows_without_negatives`` reports the fraction of anchors left out.
EMC² draws its negatives from the whole data set, so it keeps an anchor whose chain holds one (``emc2_used``).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import gather_no_grad
from ..samples import SampleRequest


class ContrastiveLoss(nn.Module):
    """Base class: builds the fp32 logits and the metrics every loss shares.

    Args:
        temperature: τ in ``s = cos / τ``. SimCSE uses 0.05, SimCLR 0.1-0.5.
        hard_negative_weight: added to the logit of each anchor's own hard negative, SimCSE's
            ``hard_negative_weight`` (it adds this value to the scaled logit; 0 leaves the logit as it is).
        rank: this process's index among the ``world_size`` processes that each score their own anchors against the
            gathered candidates (0 for a single process).
        world_size: the number of those processes (1 for a single process).
    """

    name: str = "base"
    citation: str = ""
    # the run settings (simcse_flat.config.LossArguments) this loss reads beyond temperature and hard_negative_weight:
    # init argument -> setting, for losses.build_loss_from_settings
    settings: ClassVar[dict[str, str]] = {}
    needs_dataset_size: bool = False  # keeps per-sample state: built with the data set's size
    seeded: bool = False  # draws random numbers of its own: built with the run's seed

    def __init__(
        self, temperature: float = 0.05, hard_negative_weight: float = 0.0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_rank(rank, world_size)
        self.temperature = temperature
        self.hard_negative_weight = hard_negative_weight
        self.rank, self.world_size = rank, world_size

    def own_rows(self, local_rows: int) -> slice:
        """Where this process's ``local_rows`` rows lie in a tensor gathered from every process (rank order)."""
        return own_rows(self.rank, local_rows)

    def get_config_dict(self) -> dict[str, float | str]:
        return {"loss": self.name, "temperature": self.temperature, "hard_negative_weight": self.hard_negative_weight}

    def logits(
        self,
        anchors: Tensor,
        candidates: Tensor,
        hard_negative_index: Tensor | None = None,
        exclude_index: Tensor | None = None,
        duplicate_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, N)`` fp32 logits ``cos(a_i, c_j) / τ``, with the hard-negative bias and the exclusions (self,
        duplicates: ``-inf``, so they count in no sum and no chain proposes them) applied."""
        a = F.normalize(anchors.float(), dim=-1)
        c = F.normalize(candidates.float(), dim=-1)
        with torch.autocast(device_type=a.device.type, enabled=False):
            logits = a @ c.T / self.temperature  # (B, N)
        rows = torch.arange(logits.size(0), device=logits.device)
        if hard_negative_index is not None and self.hard_negative_weight != 0.0:
            bias = torch.zeros_like(logits)
            bias[rows, hard_negative_index] = self.hard_negative_weight
            logits = logits + bias
        if exclude_index is not None:
            logits = logits.masked_fill(_one_hot_mask(logits, exclude_index), float("-inf"))
        if duplicate_mask is not None:
            logits = logits.masked_fill(duplicate_mask, float("-inf"))
        return logits

    def forward(
        self,
        anchors: Tensor,
        candidates: Tensor,
        positive_index: Tensor,
        *,
        anchor_ids: Tensor | None = None,
        candidate_ids: Tensor | None = None,
        hard_negative_index: Tensor | None = None,
        exclude_index: Tensor | None = None,
        duplicate_mask: Tensor | None = None,
        **extra: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``extra``: inputs particular to one loss (EMC²'s ``chain_negatives``, from :meth:`inputs_for_step`)."""
        if candidates.size(0) < 2:
            raise ValueError("a contrastive loss needs at least 2 candidates (batch size >= 2)")
        logits = self.logits(anchors, candidates, hard_negative_index, exclude_index, duplicate_mask)
        loss, metrics = self.compute_loss_from_logits(
            logits, positive_index, anchor_ids=anchor_ids, candidate_ids=candidate_ids, **extra
        )
        metrics.update(logit_metrics(logits.detach(), positive_index))
        return loss, metrics

    def mean_over_rows(self, per_row: Tensor, keep: Tensor) -> Tensor:
        """The mean of ``per_row`` ``(B,)`` over the rows ``keep`` marks, counted over every process: this process's
        sum times ``W`` over the kept rows of all ``W`` (DDP's average over processes then gives the one-process
        mean; with every row kept it is the plain mean). No kept row anywhere: 0, with a gradient of zeros."""
        kept_everywhere = gather_no_grad(keep.sum().reshape(1), self.world_size).sum().clamp(min=1)
        return torch.where(keep, per_row, 0.0).sum() * self.world_size / kept_everywhere

    def inputs_for_step(self, encode_samples: Callable[[SampleRequest], Tensor]) -> dict:
        """The one hook between a loss and the loop, called once a step before the step's loss calls.

        ``encode_samples`` embeds a :class:`~simcse_flat.samples.SampleRequest` (data-set samples, each as one of its
        views) with the current model, with gradient (one more forward pass). A loss that needs samples outside the batch (EMC²'s chain negatives) returns the keyword inputs of
        this step's calls; the others need nothing, and the loop then runs no extra pass.
        """
        return {}

    def compute_loss_from_logits(
        self,
        logits: Tensor,
        positive_index: Tensor,
        *,
        anchor_ids: Tensor | None = None,
        candidate_ids: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss proper: ``(B, N)`` fp32 logits and positive columns in, ``(loss, metrics)`` out."""
        raise NotImplementedError


def own_rows(rank: int, local_rows: int) -> slice:
    """Process ``rank``'s rows in a tensor gathered from every process, each holding ``local_rows`` (rank order)."""
    return slice(rank * local_rows, (rank + 1) * local_rows)


def check_rank(rank: int, world_size: int) -> None:
    """A ``ValueError`` unless ``0 <= rank < world_size``: a rank past the end would slice no rows at all."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


def _one_hot_mask(logits: Tensor, index: Tensor) -> Tensor:
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(logits.size(0), device=logits.device), index] = True
    return mask


def positive_logits(logits: Tensor, positive_index: Tensor) -> Tensor:
    """``s_t`` for each row: ``(B,)``."""
    return logits.gather(1, positive_index[:, None]).squeeze(1)


def negative_mask(logits: Tensor, positive_index: Tensor) -> Tensor:
    """``(B, N)`` bool: the columns that count as a negative of each row (finite, not the positive)."""
    return torch.isfinite(logits) & ~_one_hot_mask(logits, positive_index)


def rows_with_negatives(logits: Tensor, positive_index: Tensor) -> tuple[Tensor, Tensor]:
    """Which rows have a negative left, ``(B,)`` bool, and the logits with every other row set to 0: finite, so
    that neither the loss of such a row nor its gradient (zeros: a constant) is NaN where it is left out."""
    keep = negative_mask(logits, positive_index).any(dim=1)
    return keep, torch.where(keep[:, None], logits, 0.0)


def negative_logsumexp(logits: Tensor, positive_index: Tensor) -> Tensor:
    """``logsumexp_{i != t} s_i`` for each row, stable: the positive is masked to -inf, not subtracted."""
    return torch.logsumexp(logits.masked_fill(_one_hot_mask(logits, positive_index), float("-inf")), dim=1)


def logit_metrics(logits: Tensor, positive_index: Tensor) -> dict[str, Tensor]:
    """What every loss logs, so runs with different losses read on one axis: means over the rows with a negative
    left, and the fraction of rows without one."""
    keep, logits = rows_with_negatives(logits, positive_index)
    count = keep.sum().clamp(min=1)

    def mean(values: Tensor) -> Tensor:
        return torch.where(keep, values.float(), 0.0).sum() / count

    s_pos = positive_logits(logits, positive_index)
    infonce = torch.logsumexp(logits, dim=1) - s_pos
    flatnce = negative_logsumexp(logits, positive_index) - s_pos
    return {
        "infonce": mean(infonce),
        "flatnce": mean(flatnce),
        "accuracy": mean(logits.argmax(dim=1) == positive_index),
        "positive_logit": mean(s_pos),  # cos / τ of the positive pair
        "rows_without_negatives": 1.0 - keep.float().mean(),
    }
