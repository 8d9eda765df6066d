"""DCL: InfoNCE with the positive taken out of the denominator, optionally with a weighted positive term (DCLW)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import gather_with_grad
from .base import ContrastiveLoss, negative_logsumexp, positive_logits, rows_with_negatives


class DCLLoss(ContrastiveLoss):
    r"""Decoupled Contrastive Learning (Yeh et al., 2022): the positive leaves the denominator.

    .. math::

        \ell_i = -w_i\, s_{i,t_i} + \operatorname{logsumexp}_{j \ne t_i} s_{ij},
        \qquad s_{ij} = \cos(a_i, c_j) / \tau,

    with :math:`t_i` the column of anchor :math:`i`'s positive and the loss the mean of :math:`\ell_i` over
    anchors. InfoNCE's gradient carries a factor :math:`1 - p_{i,t_i}` (the softmax mass on the positive) on every
    term, the "negative-positive coupling" that shrinks the gradient once positives win, worst at small batch;
    dropping the positive from the denominator removes it. DCL has :math:`w_i = 1`; DCLW weights the positive
    term with a von Mises-Fisher-style factor,

    .. math::

        w_i = 2 - \frac{e^{\cos(a_i, c_{t_i}) / \sigma}}{\frac{1}{K}\sum_{k} e^{\cos(a_k, c_{t_k}) / \sigma}},

    the mean over the :math:`K` anchors of the step (every process's: the positive cosines are gathered with
    gradient, so the weights do not depend on the number of processes). The weights average 1 and are below 1 for
    pairs that already agree more than the rest, so harder positives pull harder. The gradient flows through
    :math:`w_i` as well: plain autograd of the formula, as in the widely used PyTorch implementation
    (github.com/raminnakhli/Decoupled-Contrastive-Learning, ``2 - K * softmax(cos / σ)``).

    Paper: Yeh, Hong, Hsu, Liu, Chen, LeCun, "Decoupled Contrastive Learning" (ECCV 2022, arXiv 2110.06848).

    Args:
        temperature: τ.
        hard_negative_weight: see :class:`~simcse_flat.losses.base.ContrastiveLoss`.
        weight_sigma: σ of the DCLW weighting; ``None`` (default) is plain DCL. The paper uses 0.5.
        rank, world_size: this process and the number of processes (see
            :class:`~simcse_flat.losses.base.ContrastiveLoss`); DCLW gathers every process's positive cosines.

    Relations: with :math:`w_i = 1`, :math:`\ell_i` *is* :class:`FlatNCELoss`'s
    :math:`\operatorname{logsumexp}_{j \ne t_i} s_{ij} - s_{i,t_i}`, value and gradient, for any candidates;
    the two papers reach it from two sides (DCL: remove the coupling factor; FlatNCE: divide out InfoNCE's
    per-row factor :math:`1 - p_t`, which is the same thing). The only difference is DCLW's weighting, and in
    the authors' SimCLR setting both views of every other image are negatives: ``negatives: all_views``, the
    vision default (:mod:`simcse_flat.views`).
    """

    name = "dcl"
    settings = {"weight_sigma": "dcl_weight_sigma"}
    citation = """@inproceedings{yeh2022decoupled,
  title={Decoupled Contrastive Learning},
  author={Yeh, Chun-Hsiao and Hong, Cheng-Yao and Hsu, Yen-Chi and Liu, Tyng-Luh and Chen, Yubei and LeCun, Yann},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}"""

    def __init__(
        self,
        temperature: float = 0.05,
        hard_negative_weight: float = 0.0,
        weight_sigma: float | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(temperature, hard_negative_weight, rank, world_size)
        if weight_sigma is not None and weight_sigma <= 0:
            raise ValueError(f"weight_sigma must be > 0 (or None for plain DCL), got {weight_sigma}")
        self.weight_sigma = weight_sigma

    def get_config_dict(self) -> dict[str, float | str]:
        config = super().get_config_dict()
        return config if self.weight_sigma is None else {**config, "weight_sigma": self.weight_sigma}

    def compute_loss_from_logits(self, logits, positive_index, *, anchor_ids=None, candidate_ids=None):
        s_pos = positive_logits(logits, positive_index)  # the positive is never masked: finite on every row
        keep, logits = rows_with_negatives(logits, positive_index)  # a row with no negative: left out (base.py)
        if self.weight_sigma is None:
            return self.mean_over_rows(negative_logsumexp(logits, positive_index) - s_pos, keep), {}
        weights = self.positive_weights(s_pos * self.temperature)
        loss = self.mean_over_rows(negative_logsumexp(logits, positive_index) - weights * s_pos, keep)
        return loss, {"dcl_weight_min": weights.detach().min(), "dcl_weight_max": weights.detach().max()}

    def positive_weights(self, positive_cosines: Tensor) -> Tensor:
        """DCLW's :math:`w_i` for this process's anchors from their ``(B,)`` positive cosines."""
        everyone = gather_with_grad(positive_cosines, self.world_size)  # (W*B,)
        # e^{c_i/σ} / mean_k e^{c_k/σ} = K softmax_i, stable
        relative = everyone.numel() * torch.softmax(everyone / self.weight_sigma, dim=0)
        return 2.0 - relative[self.own_rows(positive_cosines.numel())]
