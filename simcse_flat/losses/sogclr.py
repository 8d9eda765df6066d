"""SogCLR: the global contrastive loss with a per-sample moving average of its partition function."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import gather_no_grad
from .base import ContrastiveLoss, positive_logits, rows_with_negatives


class SogCLRLoss(ContrastiveLoss):
    r"""SogCLR (Yuan et al., 2022): small-batch SGD on the global contrastive loss via a moving-average denominator.

    The objective is the global contrastive loss (the same as EMC²'s, up to the constant :math:`\log n_i`):

    .. math::

        F = \frac{1}{m} \sum_{i=1}^{m} \Big[ \log g_i - s_{i,t_i} \Big], \qquad
        g_i = \frac{1}{n_i} \sum_{z \in D_i} e^{s(x_i, z)},

    with :math:`m` the data-set size, :math:`D_i` the :math:`n_i` negatives of sample :math:`i` over the whole data
    set, :math:`s = \cos / \tau` and :math:`t_i` the positive's column. Its gradient
    :math:`\frac{1}{n_i}\sum_z \frac{e^{s(x_i,z)}}{g_i} \nabla s(x_i, z) - \nabla s_{i,t_i}` needs :math:`g_i`, a
    sum over the data set. SogCLR tracks it per sample with a moving average of the batch estimate
    :math:`\hat g_i = \frac{1}{n_i}\sum_{j \ne t_i} e^{s_{ij}}` (the mean over the batch's negatives of row
    :math:`i`),

    .. math::

        u_i \leftarrow (1 - \gamma)\, u_i + \gamma\, \hat g_i \quad (u_i \leftarrow \hat g_i \text{ on the first
        visit}), \qquad
        \nabla \ell_i = \frac{1}{n_i} \sum_{j \ne t_i} \frac{e^{s_{ij}}}{u_i} \nabla s_{ij} - \nabla s_{i,t_i},

    in that order: the gradient of the step uses the :math:`u_i` that already includes this batch, as LibAUC's
    ``GCLoss`` does. Here :math:`n_i` counts the row's negative candidates (every
    column but the positive and any ``-inf`` exclusion), and :math:`u_i` is stored as :math:`\log u_i` in fp32:
    at τ = 0.01 :math:`e^{s}` reaches :math:`e^{100}`, past fp32, while its log stays near 100 and the weights
    :math:`e^{s_{ij} - \log u_i}` stay O(1). The returned value is :math:`\log u_i - s_{i,t_i}`, the running
    estimate of :math:`F` (a stop-gradient term carries the gradient above).

    Paper: Yuan, Wu, Qiu, Du, Zhang, Zhou, Yang, "Provable Stochastic Optimization for Global Contrastive Learning:
    Small Batch Does Not Harm Performance" (ICML 2022, arXiv 2202.12387); reference code: LibAUC ``GCLoss``.

    Args:
        dataset_size: number of samples; :math:`\log u` takes 4 bytes (fp32) each.
        temperature: τ.
        hard_negative_weight: see :class:`~simcse_flat.losses.base.ContrastiveLoss`.
        gamma: weight of the batch estimate in the moving average, in (0, 1]. 0.9 (LibAUC's default) keeps 10%
            of the past; 1 forgets it.
        rank, world_size: see :class:`~simcse_flat.losses.base.ContrastiveLoss`; every process's updated rows are
            gathered, so all hold one state.

    Inputs: ``anchor_ids`` (data-set indices) are required. Metrics: ``sogclr_log_u`` (mean :math:`\log u_i`),
    ``sogclr_weight_mean`` (mean over anchors of :math:`\hat g_i / u_i`; 1 when the average agrees with the batch).

    Relations: with ``gamma=1``, :math:`u_i = \hat g_i` and the weights are the softmax over the row's negatives,
    so the gradient is :class:`FlatNCELoss`'s (= DCL's) and the value is FlatNCE's minus :math:`\log n_i`.
    LibAUC writes the same update with cosines as logits, a gradient τ times ours; ours has InfoNCE's scale.
    LibAUC's SimCLR version averages :math:`u_i` over the two directions; with ``symmetric`` views the trainer
    calls this loss once per direction, and the two updates run one after the other.
    """

    name = "sogclr"
    needs_dataset_size = True
    settings = {"gamma": "sogclr_gamma"}
    citation = """@inproceedings{yuan2022provable,
  title={Provable Stochastic Optimization for Global Contrastive Learning: Small Batch Does Not Harm Performance},
  author={Yuan, Zhuoning and Wu, Yuexin and Qiu, Zi-Hao and Du, Xianzhi and Zhang, Lijun and Zhou, Denny
          and Yang, Tianbao},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2022}
}"""

    def __init__(
        self,
        dataset_size: int,
        temperature: float = 0.05,
        hard_negative_weight: float = 0.0,
        gamma: float = 0.9,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(temperature, hard_negative_weight, rank, world_size)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.gamma = gamma
        # -inf = no estimate yet: the first visit takes the batch estimate as it is
        self.register_buffer("log_u", torch.full((dataset_size,), float("-inf"), dtype=torch.float32))

    def get_config_dict(self) -> dict[str, float | str]:
        return {**super().get_config_dict(), "gamma": self.gamma}

    def compute_loss_from_logits(self, logits, positive_index, *, anchor_ids=None, candidate_ids=None):
        if anchor_ids is None:
            raise ValueError("SogCLRLoss keeps a moving average per data-set sample: pass anchor_ids")
        # a row with no negative has no estimate: left out of the loss and of the state (base.py)
        keep, logits = rows_with_negatives(logits, positive_index)
        negatives = torch.isfinite(logits) & ~F.one_hot(positive_index, logits.size(1)).bool()
        count = negatives.sum(dim=1).clamp(min=1)
        neg_logits = logits.masked_fill(~negatives, float("-inf"))
        batch_log_g = torch.logsumexp(neg_logits.detach(), dim=1) - count.log()  # log ĝ_i
        log_u = self._update(anchor_ids, batch_log_g, keep)
        log_u = torch.where(keep, log_u, 0.0)  # finite where left out (no estimate yet may be -inf)
        weights = torch.exp(neg_logits.detach() - log_u[:, None])  # e^{s_ij} / u_i, 0 off the negatives
        weighted = (weights * logits.masked_fill(~negatives, 0.0)).sum(dim=1) / count
        loss = log_u - positive_logits(logits, positive_index) + (weighted - weighted.detach())
        kept = keep.sum().clamp(min=1)
        return self.mean_over_rows(loss, keep), {
            "sogclr_log_u": torch.where(keep, log_u, 0.0).sum() / kept,
            "sogclr_weight_mean": torch.where(keep, torch.exp(batch_log_g - log_u), 0.0).sum() / kept,
        }

    @torch.no_grad()
    def _update(self, anchor_ids: Tensor, batch_log_g: Tensor, estimated: Tensor) -> Tensor:
        """Blend the batch estimate into ``log u`` of the anchors (log domain) where the row has one
        (``estimated``), store it everywhere, return it."""
        old = self.log_u[anchor_ids]
        keep = math.log(1.0 - self.gamma) if self.gamma < 1.0 else float("-inf")
        blended = torch.logaddexp(old + keep, batch_log_g + math.log(self.gamma))
        new = torch.where(torch.isneginf(old), batch_log_g, blended)
        new = torch.where(estimated, new, old)
        ids = gather_no_grad(anchor_ids, self.world_size)  # every process writes every process's rows: one state
        self.log_u[ids] = gather_no_grad(new, self.world_size)
        return new
