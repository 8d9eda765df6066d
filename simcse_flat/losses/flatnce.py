"""FlatNCE: InfoNCE with the positive taken out of the log-sum-exp."""

from __future__ import annotations

from torch import Tensor

from .base import ContrastiveLoss, negative_logsumexp, positive_logits, rows_with_negatives


class FlatNCELoss(ContrastiveLoss):
    r"""FlatNCE (Chen et al., 2021): the contrastive loss that does not saturate at small batch sizes.

    .. math::

        \ell_i = \operatorname{logsumexp}_{j \ne t_i} s_{ij} - s_{i,t_i}
               = \log \xi_i, \qquad \xi_i = \sum_{j \ne t_i} e^{s_{ij} - s_{i,t_i}},
        \qquad s_{ij} = \cos(a_i, c_j) / \tau

    InfoNCE is :math:`\log(1 + \xi_i)`, with gradient :math:`\nabla \xi_i / (1 + \xi_i)`; FlatNCE's gradient is that
    of :math:`\xi_i / \operatorname{sg}(\xi_i)` (``sg`` = stop gradient), :math:`\nabla \xi_i / \xi_i`. Row by row,
    FlatNCE's gradient is therefore exactly InfoNCE's divided by :math:`1 - p_{i,t_i} = \xi_i / (1 + \xi_i)`, the
    softmax mass off the positive. Once positives clearly beat negatives that factor is small and differs from row
    to row: InfoNCE's step is dominated by the rows whose positive is not yet won, FlatNCE weighs every row alike.
    Adam cancels a common scale, not this per-row reweighting, which is what FlatNCE changes. It is not a matter of
    rounding: at an InfoNCE loss of ~1e-4 the fp32 InfoNCE gradient equals the float64 one; only where the fp32
    loss is exactly 0.0 does InfoNCE lose the positive's pull, while FlatNCE's stays (``tests/test_flatnce_gain.py``).
    The value can be negative (whenever :math:`\xi_i < 1`); that is normal.
    Computed with a masked ``torch.logsumexp`` in fp32, so it is stable at τ = 0.01 with no explicit ``exp``.

    Paper: Chen, Gan, Li, Guo, Chen, Gao, Chung, Xu, Zeng, Lu, Li, Carin, Tao, "Simpler, Faster, Stronger:
    Breaking The log-K Curse On Contrastive Learners With FlatNCE" (arXiv 2107.01152). The logsumexp form is
    from Su Jianlin's post "FlatNCE: is poor small-batch contrastive learning a floating-point error?" (2021).

    Relations: the metrics carry ``infonce`` (= :math:`\log(1 + \xi)`, the value FlatCLR's code reports) so curves
    compare with :class:`InfoNCELoss`. DCL (Yeh et al., 2022) drops the positive from the denominator in the same
    way; with one positive per anchor and no extra weighting the two coincide.
    """

    name = "flatnce"
    citation = """@article{chen2021simpler,
  title={Simpler, Faster, Stronger: Breaking The log-K Curse On Contrastive Learners With FlatNCE},
  author={Chen, Junya and Gan, Zhe and Li, Xuan and Guo, Qing and Chen, Liqun and Gao, Shuyang and Chung, Tagyoung
          and Xu, Yi and Zeng, Belinda and Lu, Wenlian and others},
  journal={arXiv preprint arXiv:2107.01152},
  year={2021}
}"""

    def compute_loss_from_logits(self, logits: Tensor, positive_index: Tensor, *, anchor_ids=None, candidate_ids=None):
        keep, logits = rows_with_negatives(logits, positive_index)  # a row with no negative: left out (base.py)
        per_row = negative_logsumexp(logits, positive_index) - positive_logits(logits, positive_index)
        return self.mean_over_rows(per_row, keep), {}
