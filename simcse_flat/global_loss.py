r"""The global contrastive loss of a finite data set and its full gradient, computed exactly.

For ``m`` samples with views ``x_i`` (anchor) and ``y_i`` (positive) the objective EMC² and SogCLR minimise is

.. math::

    L(\theta) = \frac{1}{m} \sum_i \Big[ \log \sum_{z \in D_i} e^{s(x_i, z)} - s(x_i, y_i) \Big],
    \qquad s = \cos / \tau, \qquad D_i = \{y_j : j \ne i\},

which is :meth:`~simcse_flat.losses.emc2.EMC2Loss.global_loss` on the table of all ``m`` embeddings, and also
DCL's (= FlatNCE's log-sum-exp) loss on one batch of the whole data set. The candidates follow the loop's own
pairing (:func:`simcse_flat.views.contrastive_loss_on_views`): ``cross_view`` (one direction, or the mean of
both when ``symmetric``) or ``all_views`` (every view an anchor against both views of every other sample, as
SimCLR's NT-Xent; ``2m - 2`` negatives), with the duplicate mask when content keys are given. So the exact
``L`` is the objective of exactly the views a run trains on.

The whole table is embedded in chunks without gradient, the loss and its gradient with respect to the embeddings
are computed on the table, and each chunk is re-encoded with gradient to carry that gradient into the weights
(GradCache's two passes, :mod:`simcse_flat.grad_cache`): the exact :math:`\nabla L` in the memory of one chunk.
It needs an encoder whose rows do not mix (group norm or none, no dropout): what ``scripts/bench_global_loss.py``
trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses.base import ContrastiveLoss, negative_logsumexp, positive_logits
from .views import contrastive_loss_on_views


class GlobalLoss(ContrastiveLoss):
    """:math:`\\frac{1}{|rows|}\\sum_i [\\log\\sum_{z \\in D_i} e^{s_{iz}} - s_{i,t_i}]` on the logits it is given:
    on a table of the whole data set, the global loss. It also keeps, per call, each row's
    :math:`\\log g_i = \\log \\frac{1}{n_i} \\sum_{z \\in D_i} e^{s_{iz}}` (SogCLR's :math:`u_i` target)."""

    name = "global"

    def __init__(self, temperature: float) -> None:
        super().__init__(temperature)
        self.log_partitions: list[Tensor] = []

    def compute_loss_from_logits(self, logits, positive_index, *, anchor_ids=None, candidate_ids=None):
        negatives = negative_logsumexp(logits, positive_index)
        count = (torch.isfinite(logits).sum(dim=1) - 1).clamp(min=1)  # the row's negatives: not -inf, not positive
        self.log_partitions.append((negatives - count.log()).detach())
        return (negatives - positive_logits(logits, positive_index)).mean(), {}


@dataclass
class Objective:
    value: float  # L(θ)
    gradient: list[Tensor] | None  # ∇L(θ), one tensor per trainable parameter (model.parameters() order)
    log_partition: Tensor  # (m,) log g_i, averaged over the sample's anchor views in the log domain


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def exact_objective(model: nn.Module, table: dict, temperature: float, symmetric: bool = False,
                    negatives: str = "cross_view", chunk_size: int = 128, gradient: bool = True) -> Objective:  # fmt: skip
    """``L`` (and ``∇L``) of ``model`` on ``table``: every sample collated into one view-major batch (``sample_ids``,
    optional ``sample_keys``, and the model's inputs of ``V * m`` rows)."""
    inputs = {k: v for k, v in table.items() if k not in ("sample_ids", "sample_keys")}
    ids, keys = table["sample_ids"], table.get("sample_keys")
    rows = next(iter(inputs.values())).size(0)
    chunks = [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]
    device = next(model.parameters()).device

    def encode(part: slice) -> Tensor:
        return model(**{k: v[part].to(device) for k, v in inputs.items()})

    with torch.no_grad():
        embeddings = torch.cat([encode(part) for part in chunks])
    embeddings.requires_grad_(gradient)
    loss_fn = GlobalLoss(temperature)
    value, _ = contrastive_loss_on_views(loss_fn, embeddings, ids.to(device), symmetric, None, negatives,
                                         None if keys is None else keys.to(device))  # fmt: skip
    grads = None
    if gradient:
        (table_grad,) = torch.autograd.grad(value, embeddings)
        params = trainable(model)
        grads = [torch.zeros_like(p) for p in params]
        for part in chunks:
            pieces = torch.autograd.grad(encode(part), params, grad_outputs=table_grad[part], allow_unused=True)
            for total, piece in zip(grads, pieces):
                if piece is not None:
                    total += piece
    partitions = torch.stack(loss_fn.log_partitions)  # (calls, m): one per direction of the pairing
    log_partition = torch.logsumexp(partitions, dim=0) - math.log(partitions.size(0))
    return Objective(float(value.detach()), grads, log_partition.cpu())


def relative_error(estimate: list[Tensor], exact: list[Tensor]) -> float:
    """``‖g − ∇L‖ / ‖∇L‖`` over all parameters together."""
    difference = sum(float((g - e).pow(2).sum()) for g, e in zip(estimate, exact))
    norm = sum(float(e.pow(2).sum()) for e in exact)
    return math.sqrt(difference / max(norm, 1e-30))


def step_gradient(model: nn.Module) -> list[Tensor]:
    """The gradient the optimizer is about to apply (``.grad``; zeros where a parameter got none)."""
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in trainable(model)]
