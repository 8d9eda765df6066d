"""EMC²: the chains sample the global softmax, the gradient estimate averages to the global gradient, state resumes.

The references are exact: on a data set of a few dozen embeddings the global loss, its softmax and its gradient
are computed in full, and the sampler's output is checked against them.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from simcse_flat.losses import EMC2Loss, FlatNCELoss, InfoNCELoss, build_loss
from simcse_flat.losses.emc2 import negative_columns
from simcse_flat.losses.emc2_chains import McmcNegativeSampler
from simcse_flat.views import contrastive_loss_on_views

from conftest import end_worker, loopback_init_method, views_encoder

TAU = 0.3


@pytest.fixture(autouse=True)
def one_thread():
    # thousands of steps on tiny tensors: intra-op threads only add contention on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _table(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and positive embeddings of ``m`` samples, positives near their anchors."""
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(m, 4, generator=generator)
    return anchors, anchors + 0.5 * torch.randn(m, 4, generator=generator)


def _epochs(m: int, batch: int, seed: int = 1):
    """Batches of data-set ids, a fresh permutation per epoch, as the trainer's sampler yields them."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(m, generator=generator).split(batch)


def _step(loss_fn: EMC2Loss, anchors, positives, ids, encode_chain_negatives: bool):
    """One training step's loss on the batch ``ids`` of a fixed embedding table."""
    extra = {}
    if encode_chain_negatives:  # what a trainer does for the exact estimator: encode each chain's negative
        extra["chain_negatives"] = positives[loss_fn.sampler.negatives_to_encode(ids)]
    return loss_fn(anchors[ids], positives[ids], torch.arange(len(ids)), anchor_ids=ids, candidate_ids=ids, **extra)


def _softmax_over_negatives(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(torch.eye(len(logits), dtype=torch.bool), float("-inf")), dim=1)


# ---- the Metropolis-Hastings rule -------------------------------------------------------------------------------


def test_acceptance_probability_is_min_one_exp_score_gap():
    # 4000 chains, all at negative 4001 with stored score 1.0; candidate 4000 scores 0.3 for every anchor
    chains, stale, proposal = 4000, 1.0, 0.3
    sampler = McmcNegativeSampler(chains + 2)
    anchors, held, offered = torch.arange(chains), chains + 1, chains

    def step_on(candidate_ids, scores, **kwargs):
        sampler.negative_ids[:chains] = held
        sampler.log_scores[:chains] = stale
        every_row = torch.tensor([scores]).expand(chains, -1)
        allowed = torch.ones(chains, len(scores), dtype=torch.bool)
        return sampler.step(every_row, allowed, anchors, torch.tensor(candidate_ids), **kwargs)

    step = step_on([offered], [proposal])
    assert step.accepted.float().mean().item() == pytest.approx(torch.tensor(proposal - stale).exp().item(), abs=0.03)
    moved = sampler.negative_ids[:chains] == offered
    assert torch.equal(moved, step.accepted)
    assert torch.all(sampler.log_scores[:chains][moved] == proposal)
    assert torch.all(sampler.log_scores[:chains][~moved] == stale)  # a rejection keeps the stored score
    assert torch.equal(step.column, torch.where(step.accepted, 0, -1))  # a rejected chain's negative is elsewhere

    # the held negative in the batch too: its score is recomputed (0.0 < 0.3), so proposing 4000 always wins and
    # proposing the held negative changes nothing -- half the chains move, whatever the stale score said
    step = step_on([offered, held], [proposal, 0.0])
    assert (sampler.negative_ids[:chains] == offered).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.all(sampler.log_scores[:chains][sampler.negative_ids[:chains] == held] == 0.0)
    assert torch.all(step.column >= 0)  # every chain's negative is a column of the batch

    # an encoded chain negative (current_scores) refreshes the score the same way
    assert step_on([offered], [proposal], current_scores=torch.zeros(chains)).accepted.all()
    # an empty chain accepts its first proposal
    sampler.negative_ids[:chains] = -1
    sampler.log_scores[:chains] = float("-inf")
    one = torch.ones(chains, 1, dtype=torch.bool)
    assert sampler.step(torch.full((chains, 1), -5.0), one, anchors, torch.tensor([offered])).accepted.all()


def test_proposals_are_one_column_per_other_sample():
    # SimCSE-sup layout: positives of 3 samples, then their hard negatives (same ids), one column excluded
    ids = torch.tensor([5, 7, 9])
    logits = torch.zeros(3, 6)
    logits[2, 1] = float("-inf")
    allowed = negative_columns(logits, torch.arange(3), ids, ids.repeat(2))
    expected = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_chain_negatives_follow_the_global_softmax():
    # batches of 4 out of 8 samples; each chain, run long, must visit negative z with probability p_i(z) over
    # the whole data set (self excluded), not the batch's softmax and not the uniform proposal
    m, batch, epochs, burn_in = 8, 4, 3000, 20
    anchors, positives = _table(m)
    loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, kernel="paper")
    scores = loss_fn.logits(anchors, positives)  # (m, m) s(x_i, y_j), fixed
    visits = torch.zeros(m, m)
    batches = _epochs(m, batch)
    for epoch in range(epochs):
        for _ in range(m // batch):
            ids = next(batches)
            logits = scores[ids][:, ids]
            loss_fn.sampler.step(logits, negative_columns(logits, torch.arange(batch), ids, ids), ids, ids)
            if epoch >= burn_in:
                visits[ids, loss_fn.sampler.negative_ids[ids]] += 1
    empirical = visits / visits.sum(dim=1, keepdim=True)
    target = _softmax_over_negatives(scores)
    uniform = (1 - torch.eye(m)) / (m - 1)
    assert visits.diagonal().sum() == 0  # a sample is never its own negative
    assert (0.5 * (empirical - target).abs().sum(dim=1)).max() < 0.05  # total variation, per anchor
    assert (0.5 * (uniform - target).abs().sum(dim=1)).min() > 0.4  # ...which the proposal alone is far from


# ---- the gradient estimate ----------------------------------------------------------------------------------------

# 8 distinct samples repeated 8 times (m = 64): a legitimate data set whose exact global gradient with respect to
# the 8 base embeddings averages 8 independent chains per base sample, so a few thousand steps pin it down


def _replicated_table():
    base_anchors, base_positives = _table(8)
    base_anchors.requires_grad_(True)
    base_positives.requires_grad_(True)
    return base_anchors, base_positives, base_anchors.repeat(8, 1), base_positives.repeat(8, 1)


def _relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


def _exact_global_gradient() -> torch.Tensor:
    base_a, base_p, anchors, positives = _replicated_table()
    loss = EMC2Loss(dataset_size=64, temperature=TAU).global_loss(anchors, positives)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (base_a, base_p))])


def _mean_emc2_gradient(batch: int, steps: int, encode_chain_negatives: bool, burn_in: int = 100,
                        proposals: int = 1, kernel: str = "paper") -> torch.Tensor:  # fmt: skip
    base_a, base_p, anchors, positives = _replicated_table()
    loss_fn = EMC2Loss(dataset_size=64, temperature=TAU, kernel=kernel, proposals=proposals)
    batches, total = _epochs(64, batch), 0.0
    for step in range(burn_in + steps):
        loss, _ = _step(loss_fn, anchors, positives, next(batches), encode_chain_negatives)
        if step >= burn_in:
            total = total + loss  # the embeddings are fixed: the mean gradient is the gradient of the mean loss
    (total / steps).backward()
    return torch.cat([base_a.grad.flatten(), base_p.grad.flatten()])


def test_gradient_estimate_averages_to_the_global_gradient_with_the_whole_data_set_as_batch():
    exact = _exact_global_gradient()
    assert _relative_error(_mean_emc2_gradient(64, 1000, encode_chain_negatives=False), exact) < 0.05

    # the check has power: uniform negatives (the proposal, no acceptance test) are far off
    base_a, base_p, anchors, positives = _replicated_table()
    s = EMC2Loss(dataset_size=64, temperature=TAU).logits(anchors, positives)
    off_diagonal = 1 - torch.eye(64)
    uniform = ((s * off_diagonal).sum(dim=1) / 63 - s.diagonal()).mean()
    uniform_grad = torch.cat([g.flatten() for g in torch.autograd.grad(uniform, (base_a, base_p))])
    assert _relative_error(uniform_grad, exact) > 0.3


def test_gradient_estimate_averages_to_the_global_gradient_on_half_batches_with_chain_negatives():
    # half of the data set per batch: a rejected chain's negative is usually outside the batch, and the trainer
    # passes it encoded. Leaving those anchors out instead (no chain_negatives) lands at ~0.06 on this table.
    exact = _exact_global_gradient()
    assert _relative_error(_mean_emc2_gradient(32, 2000, encode_chain_negatives=True), exact) < 0.04


def test_the_official_scan_mixes_in_a_few_steps_what_one_proposal_needs_epochs_for():
    # the official code's scan: every column of the batch in turn, the gradient averaged over its second half.
    # From cold chains on half batches, 100 steps (50 epochs of this table) pin down the global gradient with the
    # scan (or 2(B-1) uniform proposals); with one proposal a step the chains are still near their uniform start.
    exact = _exact_global_gradient()
    scan = _mean_emc2_gradient(32, 100, encode_chain_negatives=True, burn_in=2, kernel="official_scan")
    sweep = _mean_emc2_gradient(32, 100, encode_chain_negatives=True, burn_in=2, proposals=62)
    single = _mean_emc2_gradient(32, 100, encode_chain_negatives=True, burn_in=2, proposals=1)
    assert _relative_error(scan, exact) < 0.06 and _relative_error(sweep, exact) < 0.06
    assert _relative_error(single, exact) > 0.12


def test_sweep_weights_are_a_distribution_over_the_states_held_after_burn_in():
    m, batch, proposals = 16, 8, 6
    anchors, positives = _table(m)
    loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, kernel="paper", proposals=proposals)
    batches = _epochs(m, batch)
    for _ in range(4):
        _step(loss_fn, anchors, positives, next(batches), encode_chain_negatives=True)
    ids = next(batches)
    logits = loss_fn.logits(anchors[ids], positives[ids])
    proposable = negative_columns(logits, torch.arange(batch), ids, ids)
    start = loss_fn.sampler.negative_ids[ids].clone()
    twin = copy.deepcopy(loss_fn)  # same chains, same generator: the same moves
    step = loss_fn.sampler.step(logits, proposable, ids, ids, proposals=proposals)
    torch.testing.assert_close(step.weights.sum(dim=1), torch.ones(batch))
    held = step.weights[:, :-1] > 0
    assert not (held & ~proposable).any()  # only negatives of the anchor are ever held
    # each weight is a whole number of the K - K//2 recorded states
    recorded = proposals - proposals // 2
    torch.testing.assert_close(step.weights * recorded, (step.weights * recorded).round())
    # the out-of-batch slot is the chain's start, held only while no proposal was accepted
    assert (step.weights[:, -1] > 0).le(~step.accepted).all()
    assert torch.equal(loss_fn.sampler.negative_ids[ids][~step.accepted], start[~step.accepted])
    # the loss: the weighted logits of the states held, the start's from its encoding, minus the positive's
    loss, _ = _step(twin, anchors, positives, ids, encode_chain_negatives=True)
    start_logits = loss_fn.paired_logits(anchors[ids], positives[start])
    negative = (step.weights[:, :-1] * logits).sum(dim=1) + step.weights[:, -1] * start_logits
    torch.testing.assert_close(loss, (negative - logits.diagonal()).mean())


@pytest.mark.parametrize("encode_chain_negatives", [True, False])
def test_step_loss_is_chain_negative_minus_positive_over_the_anchors_used(encode_chain_negatives):
    m, batch = 8, 3
    anchors, positives = (t.requires_grad_(True) for t in _table(m))
    loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, kernel="paper")
    batches = _epochs(m, batch)
    for _ in range(10):  # warm chains, many of them holding a negative from another batch
        _step(loss_fn, anchors, positives, next(batches), encode_chain_negatives)
    ids = next(batches)
    loss, metrics = _step(loss_fn, anchors, positives, ids, encode_chain_negatives)
    grads = torch.autograd.grad(loss, (anchors, positives))

    chain = loss_fn.sampler.negative_ids[ids]  # Z_i after this step's MH move
    used = torch.ones(batch, dtype=torch.bool) if encode_chain_negatives else torch.isin(chain, ids)
    assert 0 < used.sum() and (encode_chain_negatives or not used.all())  # the case in point occurs
    s = loss_fn.logits(anchors, positives)  # the full table: s(x_i, y_j)
    expected = (s[ids, chain] - s[ids, ids])[used].mean()
    torch.testing.assert_close(loss, expected)
    for ours, reference in zip(grads, torch.autograd.grad(expected, (anchors, positives))):
        torch.testing.assert_close(ours, reference)
    assert metrics["emc2_used"].item() == pytest.approx(used.float().mean().item())


def test_symmetric_step_encodes_chain_negatives_once_and_matches_encoding_them_for_each_direction():
    # SimCLR's two directions: the second reuses the first's encodings and the batch's positive views, and must
    # give what encoding each direction's chain negatives afresh gives (a deterministic table stands in for the model)
    m, batch = 12, 4
    anchors, positives = (t.requires_grad_(True) for t in _table(m))
    loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, kernel="paper")
    batches = _epochs(m, batch)
    for _ in range(9):  # warm chains, most holding a negative from another batch
        _step(loss_fn, anchors, positives, next(batches), encode_chain_negatives=True)
    ids = next(batches)
    reference_fn = copy.deepcopy(loss_fn)

    encoded_rows = []

    def encode_samples(request):
        encoded_rows.append(len(request.ids))
        return views_encoder(positives)(request)

    embeddings = torch.cat([anchors[ids], positives[ids]])  # view-major: view 0 = anchors, view 1 = positives
    loss, _ = contrastive_loss_on_views(loss_fn, embeddings, ids, symmetric=True, encode_samples=encode_samples)
    assert encoded_rows == [batch]  # one extra forward of B rows, not one per direction

    own = torch.arange(batch)
    directions = [(anchors[ids], positives[ids]), (positives[ids], anchors[ids])]
    reference = sum(
        reference_fn(a, c, own, anchor_ids=ids, candidate_ids=ids,
                     chain_negatives=positives[reference_fn.sampler.negatives_to_encode(ids)])[0]
        for a, c in directions
    ) / 2  # fmt: skip
    torch.testing.assert_close(loss, reference)
    for ours, expected in zip(torch.autograd.grad(loss, (anchors, positives)),
                              torch.autograd.grad(reference, (anchors, positives))):  # fmt: skip
        torch.testing.assert_close(ours, expected)
    assert torch.equal(loss_fn.sampler.negative_ids, reference_fn.sampler.negative_ids)
    assert torch.isin(loss_fn.sampler.negative_ids[ids], ids).any()  # some chain moved into the batch: the reuse case


# ---- the exact global loss ------------------------------------------------------------------------------------------


def test_global_loss_of_the_whole_data_set_is_flatnce_of_one_full_batch():
    anchors, positives = _table(10)
    loss_fn = EMC2Loss(dataset_size=10, temperature=TAU)
    s = F.normalize(anchors.double(), dim=-1) @ F.normalize(positives.double(), dim=-1).T / TAU
    rows = [torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1 :]]), 0) - s[i, i] for i in range(10)]  # D_i: j != i
    by_hand = torch.stack(rows)
    assert loss_fn.global_loss(anchors, positives).item() == pytest.approx(by_hand.mean().item(), rel=1e-5)
    full_batch = (anchors, positives, torch.arange(10))
    flatnce, _ = FlatNCELoss(TAU)(*full_batch)
    assert loss_fn.global_loss(anchors, positives).item() == pytest.approx(flatnce.item(), rel=1e-6)
    # InfoNCE keeps the positive in its denominator: log(1 + e^{L_i}) row by row
    assert InfoNCELoss(TAU)(*full_batch)[0].item() == pytest.approx(torch.log1p(by_hand.exp()).mean().item(), rel=1e-5)


# ---- state ----------------------------------------------------------------------------------------------------------


def test_state_is_12_bytes_per_sample_and_survives_a_resume_bit_identically():
    m, batch = 12, 4
    anchors, positives = _table(m)
    anchors.requires_grad_(True)
    running = EMC2Loss(dataset_size=m, temperature=TAU)
    per_sample = sum(b.element_size() for b in running.sampler.buffers())
    assert per_sample == 12
    batches = _epochs(m, batch)
    for _ in range(7):
        _step(running, anchors, positives, next(batches), encode_chain_negatives=False)
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)  # what the checkpoint stores
    following = [next(batches) for _ in range(5)]

    def continue_with(loss_fn):
        out = []
        for ids in following:
            loss, metrics = _step(loss_fn, anchors, positives, ids, encode_chain_negatives=False)
            out.append((loss.detach(), torch.autograd.grad(loss, anchors)[0], metrics["emc2_acceptance"]))
        return out, copy.deepcopy(loss_fn.state_dict())

    uninterrupted, final = continue_with(running)
    resumed = build_loss("emc2", dataset_size=m, temperature=TAU, seed=123)  # the seed is overwritten by the state
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    torch.manual_seed(2024)  # the global RNG plays no part
    torch.rand(100)
    replayed, replayed_final = continue_with(resumed)
    for (a, ga, ra), (b, gb, rb) in zip(uninterrupted, replayed):
        assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(ra, rb)
    assert torch.equal(final["sampler.negative_ids"], replayed_final["sampler.negative_ids"])
    assert torch.equal(final["sampler.log_scores"], replayed_final["sampler.log_scores"])
    assert torch.equal(final["sampler._extra_state"]["generator"], replayed_final["sampler._extra_state"]["generator"])


def test_sample_ids_are_required_and_checked():
    loss_fn = build_loss("emc2", dataset_size=4)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="anchor_ids and candidate_ids"):
        loss_fn(x, x, torch.arange(2))
    with pytest.raises(ValueError, match="data-set size"):
        loss_fn(x, x, torch.arange(2), anchor_ids=torch.tensor([0, 4]), candidate_ids=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"data-set size; got -5\.\."):  # below 0 too, however far
        loss_fn(x, x, torch.arange(2), anchor_ids=torch.tensor([0, -5]), candidate_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="data-set size"):
        build_loss("emc2", temperature=0.05)
    assert isinstance(loss_fn, EMC2Loss) and loss_fn.name == "emc2" and "ICML" in loss_fn.citation


# ---- several processes ------------------------------------------------------------------------------------------

WORLD, LOCAL_BATCH, DIM, STEPS, SAMPLES = 2, 3, 5, 4, 8
STATEFUL = ("emc2", "sogclr")


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 6))


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the whole world, 6 of 8 samples each (so chains are revisited): inputs ``(2, 6, DIM)``, ids."""
    generator = torch.Generator().manual_seed(3)
    batch = WORLD * LOCAL_BATCH
    return [
        (torch.randn(2, batch, DIM, generator=generator), torch.randperm(SAMPLES, generator=generator)[:batch])
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, loss_fn, part: slice, used: list | None = None) -> list[torch.Tensor]:
    """The gradients of every step (the model is not stepped); ``used``, if given, receives EMC²'s anchors used."""
    grads = []
    for inputs, ids in _global_batches():
        model.zero_grad()
        loss, metrics = contrastive_loss_on_views(loss_fn, model(inputs[:, part].reshape(-1, DIM)), ids[part])
        loss.backward()
        grads += [p.grad.clone() for p in model.parameters()]
        if used is not None:
            used.append(round(metrics["emc2_used"].item() * 2 * len(ids[part])))  # both directions' anchors
    return grads


def _worker(rank: int, init_method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for name in STATEFUL:
            loss_fn = build_loss(name, dataset_size=SAMPLES, temperature=TAU, rank=rank, world_size=WORLD)
            used = [] if name == "emc2" else None
            grads = _train(nn.parallel.DistributedDataParallel(_encoder()), loss_fn, mine, used)
            results[name] = {"grads": grads, "state": loss_fn.state_dict(), "used": torch.tensor(used or [])}
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_worker()


def test_two_gloo_processes_hold_one_state_and_match_one_process(tmp_path):
    # one spawn for both stateful losses: starting the processes is most of the cost
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(loopback_init_method(), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for name in STATEFUL:
        loss_fn = build_loss(name, dataset_size=SAMPLES, temperature=TAU)
        single_grads = _train(_encoder(), loss_fn, slice(None))
        for key, value in loss_fn.state_dict().items():
            for r in ranks:  # every process holds the whole state, and it is the one-process state
                if key.endswith("_extra_state"):
                    assert torch.equal(r[name]["state"][key]["generator"], value["generator"])
                else:
                    torch.testing.assert_close(r[name]["state"][key], value, rtol=1e-5, atol=1e-5)
        for got, expected in zip(ranks[0][name]["grads"], single_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # EMC² without chain negatives uses only the anchors whose chain is in the batch: at a step compared above the
    # processes used different numbers of anchors, and the mean over all of them still gave the one-process gradient
    assert (ranks[0]["emc2"]["used"] != ranks[1]["emc2"]["used"]).any()


def test_hard_negative_weight_biases_the_reported_metrics_only_not_the_chains_or_the_estimate():
    """SimCSE's weight is a logit bias of its softmax; EMC²'s target p_i is the unbiased global softmax, so the MH
    scores, the chains and the estimate must not see it (the docstring's promise); the shared metrics do."""
    m = 6
    generator = torch.Generator().manual_seed(0)
    anchors, positives, hard = (torch.randn(m, 4, generator=generator) for _ in range(3))
    ids = torch.arange(m)

    def run(weight: float):
        loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, hard_negative_weight=weight, seed=2)
        steps = []
        for _ in range(3):
            steps.append(contrastive_loss_on_views(loss_fn, torch.cat([anchors, positives, hard]), ids,
                                                   encode_samples=views_encoder(positives, hard)))  # fmt: skip
        return loss_fn, steps

    plain, plain_steps = run(0.0)
    weighted, weighted_steps = run(5.0)
    for (loss0, _), (loss5, _) in zip(plain_steps, weighted_steps):
        assert loss5.item() == pytest.approx(loss0.item(), rel=1e-6)
    assert torch.equal(plain.sampler.negative_ids, weighted.sampler.negative_ids)
    torch.testing.assert_close(plain.sampler.log_scores, weighted.sampler.log_scores)
    # the metrics: InfoNCE of the biased logits, by hand (s = cos / τ, +5 on each anchor's own hard negative)
    s = F.normalize(anchors, dim=-1) @ F.normalize(torch.cat([positives, hard]), dim=-1).T / TAU
    s[ids, m + ids] += 5.0
    expected = (torch.logsumexp(s, 1) - s[ids, ids]).mean()
    assert weighted_steps[-1][1]["infonce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain_steps[-1][1]["infonce"].item() != pytest.approx(expected.item(), rel=1e-3)


def test_the_biased_metrics_leave_out_the_excluded_column_and_the_duplicates():
    """SimCLR's layout (candidates: the positives, the hard negatives, the anchors themselves) with a weight of 1.0,
    each anchor's own column excluded and anchor 3's batch mate marked as its duplicate: the metrics are InfoNCE
    of the logits the batch defines, by hand."""
    generator = torch.Generator().manual_seed(0)
    anchors, positives, hard = (torch.randn(2, 4, generator=generator) for _ in range(3))
    candidates = torch.cat([positives, hard, anchors])
    duplicate_mask = torch.zeros(2, 6, dtype=torch.bool)
    duplicate_mask[0, 1] = True  # sample 4's positive duplicates anchor 3
    loss_fn = EMC2Loss(dataset_size=10, temperature=TAU, hard_negative_weight=1.0)
    _, metrics = loss_fn(anchors, candidates, torch.arange(2), anchor_ids=torch.tensor([3, 4]),
                         candidate_ids=torch.tensor([3, 4, -4, -5, 3, 4]), hard_negative_index=torch.tensor([2, 3]),
                         exclude_index=torch.tensor([4, 5]), duplicate_mask=duplicate_mask)  # fmt: skip
    s = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T / TAU
    s[[0, 1], [2, 3]] += 1.0
    s[[0, 1], [4, 5]] = float("-inf")
    s[0, 1] = float("-inf")
    expected = (torch.logsumexp(s, 1) - s[[0, 1], [0, 1]]).mean()
    assert metrics["infonce"].item() == pytest.approx(expected.item(), rel=1e-5)
