"""SogCLR: the moving average against a hand-rolled recurrence, its gradient, low temperature, resume.

Its multi-process behaviour (one identical state on every process, the one-process gradient) is checked with
EMC²'s in ``tests/test_emc2.py::test_two_gloo_processes_hold_one_state_and_match_one_process``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from simcse_flat.losses import FlatNCELoss, SogCLRLoss, build_loss

TAU, M = 0.5, 10


def _batches(steps: int, batch: int = 4, seed: int = 0):
    """Random batches with fresh embeddings each step (the model moves), ids revisited across steps."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randperm(M, generator=generator)[:batch]
        anchors = torch.randn(batch, 6, generator=generator)
        yield ids, anchors, anchors + 0.7 * torch.randn(batch, 6, generator=generator)


def _scores(anchors: torch.Tensor, candidates: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """``cos / τ`` in float64: the reference side."""
    return F.normalize(anchors.double(), dim=-1) @ F.normalize(candidates.double(), dim=-1).T / tau


def _hand_rolled_u(steps, gamma: float) -> dict[int, float]:
    """``u_i ← (1-γ) u_i + γ mean_{j≠i} e^{s_ij}``, the first visit taking the batch mean (float64 ``exp``)."""
    u: dict[int, float] = {}
    for ids, anchors, positives in steps:
        s = _scores(anchors, positives).detach()
        for row, i in enumerate(ids.tolist()):
            batch_mean = sum(math.exp(s[row, j]) for j in range(len(ids)) if j != row) / (len(ids) - 1)
            u[i] = batch_mean if i not in u else (1 - gamma) * u[i] + gamma * batch_mean
    return u


def test_u_matches_the_hand_rolled_recurrence():
    steps = list(_batches(5))
    loss_fn = SogCLRLoss(dataset_size=M, temperature=TAU, gamma=0.9)
    for ids, anchors, positives in steps:
        loss_fn(anchors, positives, torch.arange(len(ids)), anchor_ids=ids)
    reference = _hand_rolled_u(steps, gamma=0.9)
    for i in range(M):
        if i in reference:
            assert loss_fn.log_u[i].exp().item() == pytest.approx(reference[i], rel=1e-5)
        else:  # never in a batch: still no estimate
            assert loss_fn.log_u[i].item() == float("-inf")
    visits = torch.cat([ids for ids, _, _ in steps]).bincount(minlength=M)
    assert visits.max() >= 3 and (visits == 0).any()  # both the recurrence and the untouched rows are exercised


def test_gradient_weights_negatives_by_exp_score_over_updated_u():
    steps = list(_batches(6))
    *history, (ids, anchors, positives) = steps
    loss_fn = SogCLRLoss(dataset_size=M, temperature=TAU, gamma=0.9)
    for past_ids, a, p in history:
        loss_fn(a, p, torch.arange(len(past_ids)), anchor_ids=past_ids)
    anchors.requires_grad_(True)
    positives.requires_grad_(True)
    loss, _ = loss_fn(anchors, positives, torch.arange(4), anchor_ids=ids)
    grads = torch.autograd.grad(loss, (anchors, positives))

    # the reference: u from the recurrence *including this batch*, then sum_j (e^{s_ij} / u_i) s_ij / n - s_ii
    u = _hand_rolled_u(steps, gamma=0.9)
    u_batch = torch.tensor([u[i] for i in ids.tolist()], dtype=torch.float64)
    s = _scores(anchors, positives)
    off_diagonal = 1 - torch.eye(4, dtype=torch.float64)
    weights = (s.detach().exp() / u_batch[:, None]) * off_diagonal
    surrogate = ((weights * s).sum(dim=1) / 3 - s.diagonal()).mean()
    for ours, reference in zip(grads, torch.autograd.grad(surrogate, (anchors, positives))):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    # the value is the running estimate log u_i - s_ii of the global objective
    assert loss.item() == pytest.approx((u_batch.log() - s.diagonal()).mean().item(), rel=1e-5, abs=1e-5)


def test_gamma_one_is_flatnce_gradient_and_flatnce_minus_log_n_value():
    (ids, anchors, positives), = _batches(1, batch=6)
    anchors.requires_grad_(True)
    loss_fn = SogCLRLoss(dataset_size=M, temperature=TAU, gamma=1.0)
    sogclr, _ = loss_fn(anchors, positives, torch.arange(6), anchor_ids=ids)
    flatnce, _ = FlatNCELoss(temperature=TAU)(anchors, positives, torch.arange(6))
    assert sogclr.item() == pytest.approx(flatnce.item() - math.log(5), rel=1e-5)
    g_sogclr, g_flatnce = (torch.autograd.grad(v, anchors)[0] for v in (sogclr, flatnce))
    torch.testing.assert_close(g_sogclr, g_flatnce, rtol=1e-5, atol=1e-6)


def test_log_domain_state_is_finite_where_exp_overflows_fp32():
    # τ = 0.01, near-identical embeddings: e^{s} ~ e^{100} > fp32's 3e38, but log u stays near 100
    generator = torch.Generator().manual_seed(0)
    anchors = torch.ones(4, 8) + 0.01 * torch.randn(4, 8, generator=generator)
    positives = anchors + 0.01 * torch.randn(4, 8, generator=generator)
    assert torch.isinf(torch.exp(_scores(anchors, positives, 0.01).float())).all()
    anchors.requires_grad_(True)
    loss_fn = SogCLRLoss(dataset_size=4, temperature=0.01)
    for _ in range(3):
        loss, _ = loss_fn(anchors, positives, torch.arange(4), anchor_ids=torch.arange(4))
    (grad,) = torch.autograd.grad(loss, anchors)
    assert torch.isfinite(loss_fn.log_u).all() and torch.isfinite(grad).all()
    s = _scores(anchors, positives, 0.01)
    log_batch_mean = torch.logsumexp(s.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")), dim=1) - math.log(3)
    # the same embeddings three times: the moving average of a constant is that constant
    torch.testing.assert_close(loss_fn.log_u.double(), log_batch_mean, rtol=1e-5, atol=1e-4)


def test_sogclr_state_survives_resume():
    steps = list(_batches(8))
    running = build_loss("sogclr", dataset_size=M, temperature=TAU, gamma=0.8)
    for ids, a, p in steps[:5]:
        running(a, p, torch.arange(4), anchor_ids=ids)
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_loss("sogclr", dataset_size=M, temperature=TAU, gamma=0.8)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.log_u, running.log_u)
    for ids, a, p in steps[5:]:
        a = a.requires_grad_(True)
        loss_a, _ = running(a, p, torch.arange(4), anchor_ids=ids)
        loss_b, _ = resumed(a, p, torch.arange(4), anchor_ids=ids)
        assert torch.equal(loss_a, loss_b)
        assert torch.equal(*(torch.autograd.grad(v, a)[0] for v in (loss_a, loss_b)))
    assert torch.equal(resumed.log_u, running.log_u)


def test_sogclr_is_registered_and_needs_its_inputs():
    loss_fn = build_loss("sogclr", dataset_size=M, gamma=0.5)
    assert isinstance(loss_fn, SogCLRLoss) and loss_fn.name == "sogclr" and loss_fn.gamma == 0.5
    assert loss_fn.get_config_dict()["gamma"] == 0.5 and loss_fn.temperature == 0.05
    assert loss_fn.log_u.element_size() == 4  # bytes of state per sample
    with pytest.raises(ValueError, match="data-set size"):
        build_loss("sogclr")
    for gamma in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
            build_loss("sogclr", dataset_size=M, gamma=gamma)
    with pytest.raises(ValueError, match="^SogCLRLoss keeps a moving average per data-set sample: pass anchor_ids$"):
        loss_fn(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2))


def test_u_averages_over_each_rows_negatives_hard_negatives_included():
    # step 1: two anchors against their positives and two hard negatives, 3 negatives a row; step 2: two other
    # anchors against their positives only, 1 negative a row. u_i is the first visit's batch mean, by hand.
    loss_fn = SogCLRLoss(dataset_size=M, temperature=TAU)
    generator = torch.Generator().manual_seed(3)
    anchors, candidates = torch.randn(2, 6, generator=generator), torch.randn(4, 6, generator=generator)
    _, metrics = loss_fn(anchors, candidates, torch.arange(2), anchor_ids=torch.tensor([0, 1]))
    s = _scores(anchors, candidates)
    u = [(s[0, 1:].exp().sum() / 3).item(), ((s[1, 0].exp() + s[1, 2:].exp().sum()) / 3).item()]
    assert loss_fn.log_u[:2].exp().tolist() == pytest.approx(u, rel=1e-5)
    assert metrics["sogclr_log_u"].item() == pytest.approx(sum(math.log(x) for x in u) / 2, rel=1e-5)
    assert metrics["sogclr_weight_mean"].item() == pytest.approx(1.0)  # first visit: u is the batch estimate
    loss_fn(anchors, candidates[:2], torch.arange(2), anchor_ids=torch.tensor([2, 3]))
    assert loss_fn.log_u[2:4].exp().tolist() == pytest.approx([s[0, 1].exp().item(), s[1, 0].exp().item()], rel=1e-5)


def test_a_row_with_no_negative_is_left_out_of_the_loss_the_state_and_the_metrics():
    # row 1 has its positive only (every other candidate masked, as duplicates are): one row is kept, and the loss
    # and both metrics are row 0's own, by hand (first visit: u = ĝ, the mean of e^{s} over row 0's two negatives)
    loss_fn = SogCLRLoss(dataset_size=M, temperature=TAU, gamma=0.9)
    inf = float("-inf")
    logits = torch.tensor([[2.0, 0.5, -1.0], [inf, 1.0, inf]], requires_grad=True)
    loss, metrics = loss_fn.compute_loss_from_logits(logits, torch.tensor([0, 1]), anchor_ids=torch.tensor([3, 7]))
    log_g = math.log((math.exp(0.5) + math.exp(-1.0)) / 2)
    assert loss.item() == pytest.approx(log_g - 2.0, abs=1e-6)
    assert metrics["sogclr_log_u"].item() == pytest.approx(log_g, abs=1e-6)
    assert metrics["sogclr_weight_mean"].item() == pytest.approx(1.0, rel=1e-6)
    assert loss_fn.log_u[3].item() == pytest.approx(log_g, abs=1e-6) and loss_fn.log_u[7].item() == inf
    loss.backward()
    assert torch.all(logits.grad[1] == 0)  # the row left out gets no gradient (and no NaN)
