"""InfoNCE: the SimCSE / SimCLR baseline."""

from __future__ import annotations

import torch

from .base import ContrastiveLoss, positive_logits, rows_with_negatives


class InfoNCELoss(ContrastiveLoss):
    r"""Cross-entropy of each anchor's positive against all candidates (InfoNCE, NT-Xent).

    .. math::

        \ell_i = -\log \frac{e^{s_{i,t_i}}}{\sum_j e^{s_{ij}}} = \operatorname{logsumexp}_j s_{ij} - s_{i,t_i},
        \qquad s_{ij} = \cos(a_i, c_j) / \tau

    with :math:`t_i` the column of anchor :math:`i`'s positive; the loss is the mean of :math:`\ell_i` over anchors.
    Candidates are the in-batch positives of the other anchors (gathered from every process) and, in supervised
    mode, the hard negatives, whose own-anchor logit gets ``hard_negative_weight`` added (SimCSE). With
    ``negatives: all_views`` (the vision default) every view is an anchor against both views of every other sample
    and its own column excluded: SimCLR's NT-Xent, ``2B - 2`` negatives (:mod:`simcse_flat.views`).

    Papers: van den Oord et al., "Representation Learning with Contrastive Predictive Coding" (arXiv 1807.03748);
    Gao, Yao, Chen, "SimCSE: Simple Contrastive Learning of Sentence Embeddings" (EMNLP 2021, arXiv 2104.08821).

    Relations: equals sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1 / τ``. Its gradient
    for row :math:`i` carries the factor :math:`1 - p_{i,t_i}` (the softmax mass off the positive): once positives
    win, rows whose positive is already won nearly stop counting, and the rows still far from it dominate the step.
    :class:`FlatNCELoss` divides that factor out row by row. The fp32 gradient is not the problem: at a loss of
    ~1e-4 it equals the float64 one, and only where the loss rounds to exactly 0.0 does it lose the positive's pull
    (:math:`p_t` rounds to 1; the negatives' push stays), ``tests/test_flatnce_gain.py``.
    """

    name = "infonce"
    citation = """@inproceedings{gao2021simcse,
  title={{SimCSE}: Simple Contrastive Learning of Sentence Embeddings},
  author={Gao, Tianyu and Yao, Xingcheng and Chen, Danqi},
  booktitle={Empirical Methods in Natural Language Processing (EMNLP)},
  year={2021}
}"""

    def compute_loss_from_logits(self, logits, positive_index, *, anchor_ids=None, candidate_ids=None):
        keep, logits = rows_with_negatives(logits, positive_index)  # a row with no negative: left out (base.py)
        per_row = torch.logsumexp(logits, dim=1) - positive_logits(logits, positive_index)
        return self.mean_over_rows(per_row, keep), {}
