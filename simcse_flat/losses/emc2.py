"""EMC²: the global contrastive loss, its negatives drawn by Metropolis-Hastings chains kept per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import gather_no_grad, world_size
from ..samplers import McmcNegativeSampler
from .base import ContrastiveLoss, negative_logsumexp, positive_logits

KERNELS = ("paper", "official_scan")


class EMC2Loss(ContrastiveLoss):
    r"""EMC² (Yau et al., 2024): SGD on the global contrastive loss with one MCMC negative per anchor and step.

    The objective is the contrastive loss against *every* sample of the data set, not only the batch:

    .. math::

        L(\theta) = \frac{1}{m} \sum_{i=1}^{m} \Big[ -s(x_i, y_i) + \log \sum_{z \in D_i} e^{s(x_i, z)} \Big],
        \qquad
        \nabla L = \frac{1}{m} \sum_i \Big[ -\nabla s(x_i, y_i)
                   + \mathbb{E}_{z \sim p_i} \nabla s(x_i, z) \Big],
        \qquad p_i(z) = \frac{e^{s(x_i, z)}}{\sum_{z' \in D_i} e^{s(x_i, z')}}

    with :math:`m` the data-set size, :math:`(x_i, y_i)` the anchor and positive views of sample :math:`i`,
    :math:`D_i = \{y_j : j \ne i\}` its negatives, and :math:`s = \beta \cos = \cos / \tau` (the paper's
    :math:`\beta = 1/\tau`). The expectation over :math:`p_i` is what a batch cannot compute; EMC² keeps for each
    sample a Metropolis-Hastings chain :math:`Z_i` whose stationary law is :math:`p_i`
    (:class:`~simcse_flat.samplers.McmcNegativeSampler`: propose uniformly from the batch, accept with probability
    :math:`\min(1, e^{s(x_i, Z') - s(x_i, Z_i)})`, warm-started across steps and epochs) and descends

    .. math::

        \ell = \frac{1}{|A|} \sum_{i \in A} \big[ s(x_i, Z_i) - s(x_i, y_i) \big],

    whose gradient :math:`\beta(\nabla\cos(x_i, Z_i) - \nabla\cos(x_i, y_i))` is, once the chains have mixed, an
    unbiased estimate of :math:`\nabla L` on the anchors :math:`A` used. The *value* of :math:`\ell` is a
    surrogate (the chain negative's logit minus the positive's), not :math:`L`; read ``metrics["infonce"]``, or
    :meth:`global_loss` on a table of embeddings.

    **The chain's negative must be encoded.** After an accepted proposal :math:`Z_i` is a column of the batch.
    After a rejection the chain keeps its previous negative, usually drawn in an earlier epoch and not in this
    batch. The official code re-encodes those samples with the current model (an extra forward pass) and uses them;
    a loss cannot run the encoder, so there are two modes:

    * ``chain_negatives`` given (``(B, D)``: the samples ``sampler.negatives_to_encode(anchor_ids)`` encoded by the
      trainer): the estimate above over all anchors, the paper's, unbiased for any batch size;
    * not given: anchors whose chain stays out of the batch are left out of :math:`A` for this step, positive term
      included, so every anchor used still gets both its pull and its push. Exact when the batch is the whole data
      set; otherwise biased toward easy negatives: a step accepts negative :math:`z` with probability at most
      :math:`\min(p_i(z), 1/(m-1))` (the uniform proposal caps it), while the hard negatives a chain holds on to
      are the ones left out. ``metrics["emc2_used"]`` is the fraction of anchors in :math:`A`.

    ``proposals = 1`` makes one proposal per anchor and step ("accept a random negative sample :math:`Z'_i`", as
    the paper puts it): the proposals are uniform over the data set, so :math:`p_i` is exactly invariant, but a
    chain moves at most once per epoch and needs many epochs to leave its uniform start. The official code instead
    sweeps every in-batch candidate each step (``2(B-1)`` proposals for ``B`` samples in the batch of all
    processes; ``proposals = None``, the default, takes that count) and averages the gradient over the chain's
    states after a burn-in of half the sweep; the negative term above then becomes
    :math:`\sum_t w_{it}\, s(x_i, z_t)` over the states held, weighted by how long. It mixes ``K`` times faster,
    but repeated proposals from one batch pull the chain toward the batch's own softmax (a bias the warm start
    tempers: a hard negative held from an earlier batch is rarely given up). A state in the batch is scored from
    the batch's logits; the chain's start, when out of the batch, from ``chain_negatives``. The chain's stored
    score is recomputed whenever its negative is visible and used as stored otherwise. Candidates that repeat a
    sample id (SimCSE's hard negatives) are not proposed: a chain state is a data-set index and stands for that
    sample's positive view. Multi-process: see the sampler; the mean over :math:`A` counts the anchors of every
    process, so ``W`` processes give the one-process gradient.

    Paper: Yau, Wai, Raman, Sarkar, Hong, "EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with
    Global Convergence" (ICML 2024, arXiv 2404.10575); code: github.com/amazon-science/contrastive_emc2.

    Args:
        dataset_size: number of samples; the chains take 12 bytes each (int64 index + fp32 log-score).
        temperature: τ; the paper's β is 1/τ.
        hard_negative_weight: see :class:`~simcse_flat.losses.base.ContrastiveLoss` (only reported metrics see it).
        seed: seed of the sampler's generator (its state is saved in ``state_dict()``).
        proposals: MH proposals per anchor and step, ``K`` (see above); ``K > 1`` averages over the last ``K - K//2``.
            ``None``: the official code's sweep, ``2(B-1)``.

    Inputs: ``anchor_ids`` and ``candidate_ids`` (data-set indices) are required; ``chain_negatives`` is optional.
    Metrics: ``emc2_acceptance`` (fraction of proposals accepted), ``emc2_used`` (fraction of anchors in
    :math:`A`), ``emc2_negative_logit`` (mean :math:`s(x_i, Z_i)` over :math:`A`).

    Relations: :meth:`global_loss` over the whole data set as one batch is :class:`FlatNCELoss` (= DCL) on that
    batch: :math:`D_i` leaves the positive out, so InfoNCE of the same batch is
    :math:`\log(1 + e^{L_i})` row by row. SogCLR (:class:`SogCLRLoss`) minimises the same :math:`L` with a moving
    average of the partition function instead of a sampled negative.
    """

    name = "emc2"
    needs_dataset_size = True
    citation = """@inproceedings{yau2024emc2,
  title={{EMC}$^2$: Efficient {MCMC} Negative Sampling for Contrastive Learning with Global Convergence},
  author={Yau, Chung-Yiu and Wai, Hoi-To and Raman, Parameswaran and Sarkar, Soumajyoti and Hong, Mingyi},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2024}
}"""

    def __init__(
        self,
        dataset_size: int,
        temperature: float = 0.05,
        hard_negative_weight: float = 0.0,
        seed: int = 0,
        proposals: int | None = None,
        kernel: str = "paper",
    ) -> None:
        super().__init__(temperature, hard_negative_weight)
        if proposals is not None and proposals < 1:
            raise ValueError(f"EMC² needs at least one proposal per anchor and step, got {proposals}")
        if kernel not in KERNELS:
            raise ValueError(f"EMC² kernel must be one of {KERNELS}, got {kernel!r}")
        self.sampler = McmcNegativeSampler(dataset_size, seed)
        self.proposals = proposals or 1
        self.kernel = kernel

    def get_config_dict(self) -> dict[str, float | str]:
        config = {**super().get_config_dict(), "seed": self.sampler.seed, "kernel": self.kernel}
        return {**config, "proposals": self.proposals} if self.kernel == "paper" else config

    def extra_inputs(self, anchors: Tensor, chain_negatives: Tensor | None = None) -> dict[str, Tensor | None]:
        """``chain_negatives`` ``(B, D)``: each anchor's chain negative, freshly encoded (optional, see above)."""
        return {"chain_logits": None if chain_negatives is None else self.paired_logits(anchors, chain_negatives)}

    def compute_loss_from_logits(self, logits, positive_index, *, anchor_ids=None, candidate_ids=None, chain_logits=None):
        return self._estimate(logits, positive_index, anchor_ids, candidate_ids, chain_logits)

    def paired_logits(self, anchors: Tensor, others: Tensor) -> Tensor:
        """``(B,)`` fp32 ``cos(a_i, o_i) / τ``, row against row."""
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            a, o = F.normalize(anchors.float(), dim=-1), F.normalize(others.float(), dim=-1)
            return (a * o).sum(dim=-1) / self.temperature

    def global_loss(self, anchors: Tensor, positives: Tensor) -> Tensor:
        """The exact :math:`L` for a table of all ``m`` samples: ``anchors[i]``, ``positives[i]`` are ``x_i, y_i``."""
        logits = self.logits(anchors, positives)
        index = torch.arange(logits.size(0), device=logits.device)
        return (negative_logsumexp(logits, index) - positive_logits(logits, index)).mean()

    def _estimate(self, logits, positive_index, anchor_ids, candidate_ids, chain_logits):
        if anchor_ids is None or candidate_ids is None:
            raise ValueError("EMC2Loss keeps one chain per data-set sample: pass anchor_ids and candidate_ids")
        # the paper's kernel proposes a sample uniformly: one column per sample; the scan offers every column
        one_per_id = self.kernel == "paper"
        proposable = negative_columns(logits, positive_index, anchor_ids, candidate_ids, one_per_id)
        fresh = None if chain_logits is None else chain_logits.detach()
        step = self.sampler.step(logits.detach(), proposable, anchor_ids, candidate_ids, fresh, self.proposals,
                                 self.kernel)  # fmt: skip
        negative, used = self._chain_negative_logits(logits, step, anchor_ids, chain_logits)
        per_anchor = torch.where(used, negative - positive_logits(logits, positive_index), 0.0)
        # mean over the used anchors of *all* processes; DDP's average over processes undoes the factor W
        used_everywhere = gather_no_grad(used.sum().reshape(1)).sum().clamp(min=1)
        loss = per_anchor.sum() * world_size() / used_everywhere
        return loss, {
            "emc2_acceptance": step.acceptance,
            "emc2_used": used.float().mean(),
            "emc2_negative_logit": torch.where(used, negative.detach(), 0.0).sum() / used.sum().clamp(min=1),
        }

    def _chain_negative_logits(self, logits, step, anchor_ids, chain_logits) -> tuple[Tensor, Tensor]:
        """``Σ_t w_t s(x_i, z_t)`` over the states recorded this step (``s(x_i, Z_i)`` for one proposal), with
        gradient, and whether anchor ``i`` has it (the set A)."""
        in_batch, outside = step.weights[:, :-1], step.weights[:, -1]
        negative = (in_batch * torch.where(in_batch > 0, logits, 0.0)).sum(dim=1)  # -inf columns have weight 0
        if chain_logits is None:  # a state out of the batch has no embedding: leave the anchor out
            return negative, outside == 0
        # the chain's start, when out of the batch, was encoded by the caller; only a chain never started has none
        return negative + outside * chain_logits, self.sampler.negative_ids[anchor_ids] >= 0


def negative_columns(
    logits: Tensor, positive_index: Tensor, anchor_ids: Tensor, candidate_ids: Tensor, one_per_id: bool = True
) -> Tensor:
    """``(B, N)`` bool: the columns that stand for a negative sample of each anchor.

    A column is left out if it is the anchor's positive or carries the anchor's own id, if its logit is ``-inf``
    (excluded), and with ``one_per_id`` if an earlier column carries the same id (``all_views`` has two per sample).
    """
    mask = candidate_ids[None, :] != anchor_ids[:, None]
    if one_per_id:
        mask = mask & _first_of_each_id(candidate_ids)[None, :]
    mask &= torch.isfinite(logits) & ~F.one_hot(positive_index, logits.size(1)).bool()
    return mask


def _first_of_each_id(ids: Tensor) -> Tensor:
    position = torch.arange(ids.numel(), device=ids.device)
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full_like(unique, ids.numel()).scatter_reduce(0, inverse, position, reduce="amin")
    return first[inverse] == position
