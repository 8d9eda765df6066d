"""EMC²: the global contrastive loss, its negatives drawn by Metropolis-Hastings chains kept per sample."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import gather_no_grad
from .base import ContrastiveLoss, logit_metrics, negative_logsumexp, positive_logits
from ..samples import SampleRequest, chain_states, hard_negative_ids
from .emc2_chains import McmcNegativeSampler

KERNELS = ("paper", "official_scan")
ESTIMATORS = ("refresh", "stored")


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
    :math:`D_i = \{y_j : j \ne i\}` its negatives (with supervised triples also every hard negative
    :math:`h_j`, its own included: a sentence of its own, chain state :math:`m + j`), and
    :math:`s = \beta \cos = \cos / \tau` (the paper's
    :math:`\beta = 1/\tau`). The expectation over :math:`p_i` is what a batch cannot compute; EMC² keeps for each
    sample a Metropolis-Hastings chain :math:`Z_i` whose stationary law is :math:`p_i`
    (:class:`~simcse_flat.losses.emc2_chains.McmcNegativeSampler`: propose uniformly from the batch, accept with
    probability
    :math:`\min(1, e^{s(x_i, Z') - s(x_i, Z_i)})`, warm-started across steps and epochs) and descends

    .. math::

        \ell = \frac{1}{|A|} \sum_{i \in A} \big[ s(x_i, Z_i) - s(x_i, y_i) \big],

    whose gradient :math:`\beta(\nabla\cos(x_i, Z_i) - \nabla\cos(x_i, y_i))` estimates :math:`\nabla L` on the
    anchors :math:`A` used: without bias once the chains have mixed *if* the kernel leaves :math:`p_i` invariant,
    which the ``paper`` kernel does and the ``official_scan`` kernel does not (below). The *value* of :math:`\ell` is a
    surrogate (the chain negative's logit minus the positive's), not :math:`L`; read ``metrics["infonce"]``, or
    :meth:`global_loss` on a table of embeddings.

    **The chain's negative must be encoded.** After an accepted proposal :math:`Z_i` is a column of the batch.
    After a rejection the chain keeps its previous negative, usually drawn in an earlier epoch and not in this
    batch. The official code re-encodes those samples with the current model (an extra forward pass) and uses them;
    a loss cannot run the encoder, so there are two modes:

    * ``chain_negatives`` given (``(B, D)``: the samples ``sampler.negatives_to_encode(anchor_ids)`` encoded by the
      trainer): the estimate above over all anchors, the paper's;
    * not given: anchors whose chain stays out of the batch are left out of :math:`A` for this step, positive term
      included, so every anchor used still gets both its pull and its push. Exact when the batch is the whole data
      set; otherwise biased toward easy negatives: a step accepts negative :math:`z` with probability at most
      :math:`\min(p_i(z), 1/(m-1))` (the uniform proposal caps it), while the hard negatives a chain holds on to
      are the ones left out (measured: gradient error 0.22 after 3,000 epochs against 0.08 re-encoded,
      ``docs/benchmarks.md``). ``metrics["emc2_used"]`` is the fraction of anchors in :math:`A`.

    **Two kernels, by name** (``kernel``; ``docs/benchmarks.md`` measures both, ``scripts/bench_emc2_kernels.py``):

    * ``paper``: one proposal per anchor and step ("accept a random negative sample :math:`Z'_i`", as the paper
      puts it), uniform among the batch's other samples. The batch is a uniform draw independent of the chain, so
      the proposal is uniform over the data set and :math:`p_i` is exactly invariant; but a chain moves at most
      once an epoch, so it needs epochs to leave its uniform start. ``proposals = K`` makes ``K`` such draws with
      replacement and averages over the last ``K - K//2`` states (this project's earlier default, ``2(B-1)``):
      those repeats resample one batch, so the chain settles on a law between :math:`p_i` and the batch's softmax
      (measured: total variation 0.207 at 300 epochs, 0.130 at 3,000, where the sampling floor is 0.052).
    * ``official_scan``: the official code's ``mh_step``: every proposable column of the batch in turn, in column
      order (with ``all_views`` both views of every other sample, ``2B - 2`` proposals), the gradient averaged
      over the states held in the second half of the scan (its ``--mcmc_burn_in 0.5``); the default. A scan of one
      batch is not a uniform proposal, so it does not leave :math:`p_i` exactly invariant, but measured on an exact
      small problem (40 samples, batch 4, ``docs/benchmarks.md``) it is the closest kernel: total variation to
      :math:`p_i` 0.059 at 3,000 epochs (sampling floor 0.052; paper 0.107, 2(B-1) uniform proposals 0.130),
      gradient error 0.041 (paper 0.084).

    The negative term above then becomes :math:`\sum_t w_{it}\, s(x_i, z_t)` over the states held, weighted by how
    long. A state in the batch is scored from the batch's logits; the chain's start, when out of the batch, from
    ``chain_negatives``; the stored score is used only when neither sees it. Supervised: a hard negative
    :math:`h_j` is a state of its own (``candidate_ids`` gives it as ``-1 - j``). An anchor's own :math:`h_i` is in
    every batch of that anchor, so the uniform pick among the batch's columns proposes it :math:`(m-1)/(B-1)` times
    as often as any other state; its MH score is lowered by the log of that ratio (Hastings' correction), which
    keeps :math:`p_i` invariant under the ``paper`` kernel (``tests/test_emc2_kernels.py``). Multi-process: see the
    sampler; the mean over :math:`A` counts the anchors of every process, so ``W`` processes give the one-process
    gradient.

    Paper: Yau, Wai, Raman, Sarkar, Hong, "EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with
    Global Convergence" (ICML 2024, arXiv 2404.10575); code: github.com/amazon-science/contrastive_emc2.

    Args:
        dataset_size: number of samples; the chains take 12 bytes each (int64 index + fp32 log-score).
        temperature: τ; the paper's β is 1/τ.
        hard_negative_weight: see :class:`~simcse_flat.losses.base.ContrastiveLoss`. Only the reported metrics see
            it (``infonce`` and the rest, of the biased logits): SimCSE's weight is a bias of its softmax, while
            EMC²'s target :math:`p_i` is the unbiased global one, so the MH scores, the chains and the estimate
            use the unbiased logits (``tests/test_emc2.py``).
        seed: seed of the sampler's generator (its state is saved in ``state_dict()``).
        proposals: ``paper`` kernel only: uniform proposals per anchor and step, ``K`` (``None``: 1).
        kernel: ``paper`` or ``official_scan`` (see above).
        refresh_negatives: re-encode each chain's negative every step (the exact estimator above; one more forward
            pass of ``B`` samples); ``False``: :meth:`inputs_for_step` asks for no pass, and only anchors whose
            negative is in the batch are used (cheaper, biased).
        estimator: with ``refresh_negatives``, which chain negatives are encoded and which score the MH test reads:
            ``refresh`` (every chain's negative encoded before the step, its fresh score in the MH test) or
            ``stored`` (the official code's ``main_mcmc.py``: the MH test reads the score stored when the state was
            last seen, and after the step only the anchors whose out-of-batch start is still held in the recorded
            part of the step, ``freq > mcmc_burn_in``, are encoded for the gradient; ``emc2_encoded`` reports the
            fraction). ``docs/benchmarks.md`` ("The global loss, measured exactly") measures both.
        rank, world_size: see :class:`~simcse_flat.losses.base.ContrastiveLoss`; the sampler is handed the same.

    Inputs: ``anchor_ids`` and ``candidate_ids`` (data-set indices) are required; ``chain_negatives`` is optional
    (the loop hands it over through :meth:`inputs_for_step`, the one hook between a loss and the loop).
    Metrics: ``emc2_acceptance`` (fraction of proposals accepted), ``emc2_used`` (fraction of anchors in
    :math:`A`), ``emc2_negative_logit`` (mean :math:`s(x_i, Z_i)` over :math:`A`), ``emc2_encoded`` (fraction of
    anchors whose chain negative was encoded this call: 1 for ``refresh``).

    Relations: :meth:`global_loss` over the whole data set as one batch is :class:`FlatNCELoss` (= DCL) on that
    batch: :math:`D_i` leaves the positive out, so InfoNCE of the same batch is
    :math:`\log(1 + e^{L_i})` row by row. SogCLR (:class:`SogCLRLoss`) minimises the same :math:`L` with a moving
    average of the partition function instead of a sampled negative.
    """

    name = "emc2"
    needs_dataset_size = True
    seeded = True
    settings = {"proposals": "emc2_proposals", "kernel": "emc2_kernel", "refresh_negatives": "emc2_refresh_negatives",
                "estimator": "emc2_estimator"}
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
        kernel: str = "official_scan",
        refresh_negatives: bool = True,
        estimator: str = "refresh",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(temperature, hard_negative_weight, rank, world_size)
        if proposals is not None and proposals < 1:
            raise ValueError(f"EMC² needs at least one proposal per anchor and step, got {proposals}")
        if kernel not in KERNELS:
            raise ValueError(f"EMC² kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel != "paper" and proposals not in (None, 1):
            raise ValueError(f"proposals is the paper kernel's; the {kernel} kernel offers every column once")
        if estimator not in ESTIMATORS:
            raise ValueError(f"EMC² estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator != "refresh" and not refresh_negatives:
            raise ValueError(f"the {estimator} estimator encodes chain negatives: it needs refresh_negatives")
        self.sampler = McmcNegativeSampler(dataset_size, seed, rank, world_size)
        self.estimator = estimator
        self.proposals = proposals or 1
        self.kernel = kernel
        self.refresh_negatives = refresh_negatives

    def get_config_dict(self) -> dict[str, float | str]:
        config = {**super().get_config_dict(), "seed": self.sampler.seed, "kernel": self.kernel}
        if not self.refresh_negatives:  # the cheaper, biased estimator: a card must say so
            config["refresh_negatives"] = False
        else:
            config["estimator"] = self.estimator
        return {**config, "proposals": self.proposals} if self.kernel == "paper" else config

    def forward(
        self,
        anchors: Tensor,
        candidates: Tensor,
        positive_index: Tensor,
        *,
        chain_negatives: Tensor | Callable[[Tensor], Tensor] | None = None,
        encode_held: Callable[[Tensor], Tensor] | None = None,
        **inputs,
    ) -> tuple[Tensor, dict]:
        """``chain_negatives``: each anchor's chain negative freshly encoded, ``(B, D)``, or a function of
        ``anchor_ids`` giving it (:meth:`inputs_for_step`); optional, see above. ``encode_held`` (the ``stored``
        estimator): the loop's encoder of states, called after the MH step on the starts still held."""
        if callable(chain_negatives):
            chain_negatives = chain_negatives(inputs["anchor_ids"])
        chain_logits = None if chain_negatives is None else self.paired_logits(anchors, chain_negatives)
        if encode_held is not None:  # (rows, states) -> their (len(rows),) logits, encoded with gradient
            chain_logits = functools.partial(self._held_logits, anchors, encode_held)
        # the target p_i is the unbiased global softmax: the MH scores and the estimate never see
        # hard_negative_weight; only the reported metrics do, from the logits as SimCSE biases them
        hard_negative_index = inputs.pop("hard_negative_index", None)
        loss, metrics = super().forward(anchors, candidates, positive_index, chain_logits=chain_logits, **inputs)
        if hard_negative_index is not None and self.hard_negative_weight != 0.0:
            with torch.no_grad():
                biased = self.logits(anchors, candidates, hard_negative_index, inputs.get("exclude_index"),
                                     inputs.get("duplicate_mask"))  # fmt: skip
                metrics.update(logit_metrics(biased, positive_index))
        return loss, metrics

    def inputs_for_step(self, encode_samples: Callable[[SampleRequest], Tensor]) -> dict:
        """The loop's encoder, to re-encode each anchor's chain negative once a step (:class:`ChainNegatives`), or
        (``stored``) only the held starts, after the MH step."""
        if not self.refresh_negatives:
            return {}
        if self.estimator == "stored":
            return {"encode_held": encode_samples}
        return {"chain_negatives": ChainNegatives(self.sampler, encode_samples)}

    def compute_loss_from_logits(self, logits, positive_index, *, anchor_ids=None, candidate_ids=None, chain_logits=None):
        return self._estimate(logits, positive_index, anchor_ids, candidate_ids, chain_logits)

    def _held_logits(self, anchors: Tensor, encode_held: Callable[[SampleRequest], Tensor], rows: Tensor,
                     states: Tensor) -> Tensor:  # fmt: skip
        """``(len(rows),)`` logits of ``anchors[rows]`` against the chain ``states``, encoded with gradient."""
        request = SampleRequest.of_states(states, self.sampler.dataset_size)
        return self.paired_logits(anchors[rows], encode_held(request))

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
        states = chain_states(candidate_ids, self.sampler.dataset_size)  # a hard negative is a state of its own
        proposable = negative_columns(logits, positive_index, anchor_ids, states, one_per_id)
        own_hard = chain_states(hard_negative_ids(anchor_ids), self.sampler.dataset_size)  # always in its batch
        correction = self._own_hard_negative_correction(candidate_ids)
        mh_scores = logits.detach() - correction * (states[None, :] == own_hard[:, None])
        # the chains' states before the step (clamped: a bad id is refused by the step, with its message)
        fresh, start = None, self.sampler.negative_ids[anchor_ids.clamp(0, self.sampler.dataset_size - 1)].clone()
        if torch.is_tensor(chain_logits):
            fresh = chain_logits.detach() - correction * (start == own_hard)
        step = self.sampler.step(mh_scores, proposable, anchor_ids, states, fresh, self.proposals, self.kernel)
        encoded = torch.full((), float(chain_logits is not None), device=logits.device)
        if callable(chain_logits):  # stored: encode only the out-of-batch starts held past the burn-in
            chain_logits, encoded = held_start_logits(step, start, chain_logits)
        negative, used = self._chain_negative_logits(logits, step, anchor_ids, chain_logits)
        per_anchor = torch.where(used, negative - positive_logits(logits, positive_index), 0.0)
        # mean over the used anchors of *all* processes; DDP's average over processes undoes the factor W
        used_everywhere = gather_no_grad(used.sum().reshape(1), self.world_size).sum().clamp(min=1)
        loss = per_anchor.sum() * self.world_size / used_everywhere
        return loss, {
            "emc2_acceptance": step.acceptance,
            "emc2_used": used.float().mean(),
            "emc2_negative_logit": torch.where(used, negative.detach(), 0.0).sum() / used.sum().clamp(min=1),
            "emc2_encoded": encoded,
        }

    def _own_hard_negative_correction(self, candidate_ids: Tensor) -> float:
        """Hastings' correction ``log q(h_i) / q(z)`` for an anchor's own hard negative: it is in every batch of its
        anchor, any other state only in a fraction ``(B - 1) / (m - 1)`` of them, so a uniform pick among the batch's
        columns proposes it that much more often; its MH score is lowered by the log of the ratio."""
        samples = int(torch.unique(candidate_ids[candidate_ids >= 0]).numel())  # B of every process
        return math.log((self.sampler.dataset_size - 1) / max(samples - 1, 1))

    def _chain_negative_logits(self, logits, step, anchor_ids, chain_logits) -> tuple[Tensor, Tensor]:
        """``Σ_t w_t s(x_i, z_t)`` over the states recorded this step (``s(x_i, Z_i)`` for one proposal), with
        gradient, and whether anchor ``i`` has it (the set A)."""
        in_batch, outside = step.weights[:, :-1], step.weights[:, -1]
        negative = (in_batch * torch.where(in_batch > 0, logits, 0.0)).sum(dim=1)  # -inf columns have weight 0
        if chain_logits is None:  # a state out of the batch has no embedding: leave the anchor out
            return negative, outside == 0
        # the chain's start, when out of the batch, was encoded by the caller; only a chain never started has none
        return negative + outside * chain_logits, self.sampler.negative_ids[anchor_ids] >= 0


def held_start_logits(step, start: Tensor, encode_logits: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The ``stored`` estimator's chain logits: ``(B,)``, with gradient on the anchors whose start state (out of
    the batch, ``start`` its id) holds weight in the recorded part of the step, 0 elsewhere (weight 0 there); and
    the fraction of anchors encoded. No anchor needs it: no forward pass."""
    need = (step.weights[:, -1] > 0) & (start >= 0)
    rows = need.nonzero().squeeze(1)
    logits = torch.zeros(start.numel(), device=start.device)
    if rows.numel():
        logits = logits.index_put((rows,), encode_logits(rows, start[rows]).float())
    return logits, need.float().mean()


class ChainNegatives:
    """Each anchor's chain negative for one step, encoded with gradient by the loop's ``encode_samples``.

    The first loss call of the step encodes them: one more forward pass of ``B`` rows on every process, the same
    shape each step (synchronised batch norm needs that). A second call in the same step (the mirrored direction
    of a symmetric or ``all_views`` loss, same anchors) reuses that encoding: a chain that rejected every proposal
    still holds the negative just encoded, and one that accepted holds a candidate of the batch, which is scored
    from the batch's logits (its encoded row is then not read).
    """

    def __init__(self, sampler: McmcNegativeSampler, encode_samples: Callable[[SampleRequest], Tensor]) -> None:
        self.sampler, self.encode_samples = sampler, encode_samples
        self.encoded: Tensor | None = None

    def __call__(self, anchor_ids: Tensor) -> Tensor:
        if self.encoded is None:
            states = self.sampler.negatives_to_encode(anchor_ids)
            self.encoded = self.encode_samples(SampleRequest.of_states(states, self.sampler.dataset_size))
        return self.encoded


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
