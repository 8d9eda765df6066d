"""Metropolis-Hastings chains of negatives, one per data-set sample: the state behind EMC².

For every anchor ``x_i`` of the data set the sampler keeps a Markov chain over its negatives whose stationary
distribution is the softmax ``p_i(z) ∝ exp(s(x_i, z))`` over the *whole* data set (``s = cos / τ``). A chain is
two numbers: the data-set index of its current negative ``Z_i`` and the log-score ``s(x_i, Z_i)`` from when that
score was last computed. Log-scores, not ``exp`` scores: ``exp(1 / 0.05) = 5e8`` already strains fp16 and
``exp(1 / 0.01)`` overflows fp32. That is 12 bytes a sample (int64 + fp32), so 12 MB for a million sentences.

One step, for each anchor of the batch (Metropolis-Hastings with an independent uniform proposal):

1. propose ``Z'`` uniformly among the anchor's in-batch negatives. The batch is a uniform sample of the data set
   drawn independently of the chain, so this is a uniform draw from the data set that happens to be encoded
   already: the proposal is symmetric and the ratio below needs no correction;
2. accept with probability ``min(1, exp(s(x, Z') - s(x, Z)))``, computed as ``log U < s(x, Z') - s(x, Z)`` in fp32
   on the training device. ``s(x, Z)`` is recomputed when ``Z`` is visible (in the batch, or encoded by the caller)
   and read from the chain otherwise. An empty chain (score ``-inf``) accepts its first proposal.

That is the ``paper`` kernel (one proposal a step; ``proposals = K`` makes K independent ones). The
``official_scan`` kernel is the official code's ``mh_step``: each anchor's chain is offered every proposable column
of the batch in turn, in column order, and the step reports how long it held each state over the second half of
the scan (``--mcmc_burn_in 0.5``). A scan of one batch is not a kernel that leaves the global softmax invariant
(its proposals are not a uniform draw once the first has been seen); on an exact small problem it nonetheless
comes closer to the global softmax than the paper's kernel at 300 and 3,000 epochs, within the sampling noise at
3,000 (``scripts/bench_emc2_kernels.py``, the table in ``docs/benchmarks.md``).

Chains carry over between steps and epochs (EMC²'s warm start). Randomness comes from a generator the sampler
owns, seeded and saved with the state, so a resumed run makes the same draws as an uninterrupted one whatever the
global RNG did in between.

With several processes each process updates the chains of its own anchors, then all-gathers the updated rows so
every process holds the same full state (what a checkpoint written by one process must contain). The generator
draws numbers for the anchors of *all* processes and each uses its slice (``rank`` and ``world_size``, handed over
by the loss, which has them from its caller): every process keeps the same generator state, and ``W`` processes
of ``B`` anchors make the same moves as one process with the concatenated batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..distributed import gather_no_grad
from .base import check_rank, own_rows


class McmcStep(NamedTuple):
    """Where each anchor's chain stands after a step, and where it spent the step."""

    column: Tensor  # (B,) candidate column holding the chain's negative; -1 when that negative is not in the batch
    accepted: Tensor  # (B,) bool: the chain moved this step (to a candidate: ``column`` >= 0)
    weights: Tensor  # (B, N+1) share of the recorded states on each column; the last slot: the out-of-batch start
    acceptance: Tensor  # () fraction of this step's proposals accepted


class McmcNegativeSampler(nn.Module):
    """Per-sample Metropolis-Hastings chains over negatives; buffers ``negative_ids`` and ``log_scores``.

    Args:
        dataset_size: number of samples ``m``; one chain each. Sample ids index the buffers directly. A chain's
            state is a candidate of the data set: ``j < m`` stands for sample ``j``'s positive view, ``m + j`` for
            its hard negative (supervised data).
        seed: seed of the sampler's own generator.
        rank, world_size: this process and the number of processes, from the loss that owns the sampler (its
            caller's): which slice of the draws is this process's, and how many rows the state updates gather.
    """

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if dataset_size < 2:
            raise ValueError(f"MCMC negative sampling needs a data set of at least 2 samples, got {dataset_size}")
        check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        # -1 / -inf: an empty chain, whose first proposal is always accepted
        self.register_buffer("negative_ids", torch.full((dataset_size,), -1, dtype=torch.int64))
        self.register_buffer("log_scores", torch.full((dataset_size,), float("-inf"), dtype=torch.float32))
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the same draws whatever the training device

    @property
    def dataset_size(self) -> int:
        return self.negative_ids.numel()

    def get_extra_state(self) -> dict:
        # saved inside state_dict(), so a checkpoint of the loss carries the generator too
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])

    def negatives_to_encode(self, anchor_ids: Tensor) -> Tensor:
        """Data-set index of each anchor's current negative (the anchor itself for an empty chain: any row will do).

        A trainer that encodes these with the current model and passes them to the loss as ``chain_negatives``
        gets the exact EMC² gradient estimate; see :class:`simcse_flat.losses.emc2.EMC2Loss`.
        """
        current = self.negative_ids[anchor_ids]
        return torch.where(current >= 0, current, anchor_ids)

    @torch.no_grad()
    def step(
        self,
        scores: Tensor,
        proposable: Tensor,
        anchor_ids: Tensor,
        candidate_ids: Tensor,
        current_scores: Tensor | None = None,
        proposals: int = 1,
        kernel: str = "paper",
    ) -> McmcStep:
        """MH transitions of each anchor's chain over the batch's candidates, by one of two kernels.

        * ``paper``: ``proposals`` independent uniform draws among the proposable columns (1: the paper's step,
          which leaves the global softmax invariant). With ``K > 1`` the states after the first ``K // 2`` are
          recorded.
        * ``official_scan`` (the official code's ``mh_step``): every proposable column in turn, in column order; the
          states after the first half of the scan are recorded (``--mcmc_burn_in 0.5``).

        ``weights`` says how often each recorded state was held, for an averaged gradient estimate.

        Args:
            scores: ``(B, N)`` fp32 ``s(x_i, c_j)``.
            proposable: ``(B, N)`` bool, the columns that are negatives of anchor ``i``.
            anchor_ids: ``(B,)`` data-set index of each anchor.
            candidate_ids: ``(N,)`` chain state of each candidate (a data-set index, or past it: see the loss).
            current_scores: ``(B,)`` fresh ``s(x_i, Z_i)`` of each chain's current negative, when the caller has
                encoded it; used where that negative is not a candidate of this batch (ignored for empty chains).
            proposals: ``K`` of the ``paper`` kernel.
            kernel: ``paper`` or ``official_scan``.
        """
        self._check_ids(anchor_ids, candidate_ids)
        batch, columns = scores.shape
        rows = torch.arange(batch, device=scores.device)
        schedule = _scan_schedule(proposable) if kernel == "official_scan" else None
        steps = columns if schedule is not None else proposals
        u_pick, u_accept = self._uniforms(batch, steps, scores.device)
        current = self.negative_ids[anchor_ids]
        column = column_of(current, candidate_ids, proposable)  # -1: out of the batch, or an empty chain
        score_now = torch.where(column >= 0, scores[rows, column.clamp(min=0)], self.log_scores[anchor_ids])
        if current_scores is not None:  # the chain's negative is out of the batch: its fresh encoding scores it
            score_now = torch.where((column < 0) & (current >= 0), current_scores.float(), score_now)
        moved = torch.zeros(batch, dtype=torch.bool, device=scores.device)
        weights = torch.zeros(batch, columns + 1, device=scores.device)
        accepted_total = torch.zeros((), device=scores.device)
        proposed_total = torch.zeros((), device=scores.device)
        for t in range(steps):
            if schedule is None:
                proposal, record = _pick_uniformly(proposable, u_pick[t]), torch.full_like(moved, t >= steps // 2)
            else:
                proposal, record = schedule[0][:, t], schedule[1][:, t]
            proposed = scores[rows, proposal.clamp(min=0)]
            accepted = (proposal >= 0) & (u_accept[t].log() < proposed - score_now)
            column = torch.where(accepted, proposal, column)
            score_now = torch.where(accepted, proposed, score_now)
            moved |= accepted
            accepted_total += accepted.sum()
            proposed_total += (proposal >= 0).sum()
            weights[rows[record], torch.where(column >= 0, column, columns)[record]] += 1.0
        self._store(anchor_ids, torch.where(moved, candidate_ids[column.clamp(min=0)], current), score_now)
        acceptance = accepted_total / proposed_total.clamp(min=1)
        return McmcStep(column, moved, weights / weights.sum(dim=1, keepdim=True).clamp(min=1), acceptance)

    def _uniforms(self, batch: int, steps: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(K, B)`` ``U[0, 1)`` draws twice: this process's slice of the draws for every process's anchors."""
        draws = torch.rand(2, steps, self.world_size * batch, generator=self.generator)
        mine = draws[..., own_rows(self.rank, batch)].to(device)
        return mine[0], mine[1]

    def _store(self, anchor_ids: Tensor, negative_ids: Tensor, log_scores: Tensor) -> None:
        ids = gather_no_grad(anchor_ids, self.world_size)  # every process writes every process's rows: one state
        self.negative_ids[ids] = gather_no_grad(negative_ids, self.world_size)
        self.log_scores[ids] = gather_no_grad(log_scores, self.world_size)

    def _check_ids(self, anchor_ids: Tensor, candidate_ids: Tensor) -> None:
        # an id past the end would be a device-side assert on GPU; say what is wrong instead
        low = torch.minimum(anchor_ids.min(), candidate_ids.min())
        high = torch.maximum(anchor_ids.max(), candidate_ids.max() - self.dataset_size)
        low, high = torch.stack([low, high]).tolist()  # one read on the host for both
        if low < 0 or high >= self.dataset_size:
            raise ValueError(f"sample ids must lie in [0, {self.dataset_size}), the data-set size; got {low}..{high}")


def _scan_schedule(proposable: Tensor) -> tuple[Tensor, Tensor]:
    """The official scan: ``(B, N)`` proposal at each position (the column itself, -1 where not proposable) and
    whether the state after it is recorded (proposals past the first half of the row's, as ``j > burn_in``)."""
    columns = torch.arange(proposable.size(1), device=proposable.device).expand_as(proposable)
    rank = proposable.cumsum(dim=1)  # 1-based position among the row's proposals
    burn_in = proposable.sum(dim=1, keepdim=True) // 2
    return torch.where(proposable, columns, -1), proposable & (rank > burn_in)


def _pick_uniformly(allowed: Tensor, u: Tensor) -> Tensor:
    """For each row, the ``floor(u * count)``-th allowed column: uniform over the allowed ones; -1 if there is none."""
    count = allowed.sum(dim=1)
    k = (u * count).long().clamp(max=count - 1)  # u < 1, the clamp only guards fp rounding
    column = (allowed.cumsum(dim=1) > k[:, None]).int().argmax(dim=1)  # first column past k allowed ones
    return torch.where(count > 0, column, -1)


def column_of(ids: Tensor, candidate_ids: Tensor, allowed: Tensor | None = None) -> Tensor:
    """For each ``ids[i]``, the first (allowed) column whose candidate id it is, else -1."""
    match = candidate_ids[None, :] == ids[:, None]
    if allowed is not None:
        match &= allowed
    return torch.where(match.any(dim=1), match.int().argmax(dim=1), -1)  # argmax: the first match
