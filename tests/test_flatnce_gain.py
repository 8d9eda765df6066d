"""What FlatNCE changes in InfoNCE's gradient, measured: a per-row factor 1 / (1 - p_t), not rounding noise.

The docs (``docs/benchmarks.md``, the InfoNCE and FlatNCE docstrings) rest on these two facts:

* FlatNCE's gradient is InfoNCE's divided by ``1 - p_t`` row by row (``p_t`` the softmax mass on the positive);
* fp32 InfoNCE's gradient equals the float64 one at a loss of ~1e-4; only where the fp32 loss is exactly 0.0 does
  it lose something, and what it loses is the positive's pull (``p_t`` rounds to 1), not the negatives' push.

References are float64 autograd of the formulas, written out here (the library's losses compute in fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simcse_flat.losses import FlatNCELoss, InfoNCELoss


def _pairs(batch: int = 16, dim: int = 64, cosine: float | torch.Tensor = 0.95, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit anchors and positives at a fixed cosine; the other rows' positives are the negatives (random: cos ~ 0)."""
    generator = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    noise = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    noise = F.normalize(noise - (noise * anchors).sum(-1, keepdim=True) * anchors, dim=-1)
    return anchors, cosine * anchors + (1 - cosine**2) ** 0.5 * noise


def _logits64(anchors: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    return F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / tau


def _library_gradient(loss_class, anchors, positives, tau) -> tuple[float, torch.Tensor]:
    """The library loss (fp32) and its gradient with respect to the anchors."""
    anchors = anchors.float().requires_grad_()
    loss, _ = loss_class(temperature=tau)(anchors, positives.float(), torch.arange(anchors.size(0)))
    (gradient,) = torch.autograd.grad(loss, anchors)
    return loss.item(), gradient.double()


def _gradient64(loss_of_logits, anchors, positives, tau) -> torch.Tensor:
    anchors = anchors.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss_of_logits(_logits64(anchors, positives, tau)), anchors)
    return gradient


def _infonce64(logits: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def _push_only64(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE's gradient without the positive's pull: ``sum_{j != t} p_j grad s_j`` (softmax weights held fixed)."""
    weights = torch.softmax(logits.detach(), dim=1).fill_diagonal_(0.0)
    return (weights * logits).sum(dim=1).mean()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_flatnce_gradient_is_infonce_gradient_over_one_minus_p_positive_row_by_row():
    # positives from cos 0.3 to 0.9: p_t differs a lot between rows
    anchors, positives = _pairs(cosine=torch.linspace(0.3, 0.9, 16, dtype=torch.float64)[:, None], seed=1)
    tau = 0.2
    _, infonce = _library_gradient(InfoNCELoss, anchors, positives, tau)
    _, flatnce = _library_gradient(FlatNCELoss, anchors, positives, tau)
    p_positive = torch.softmax(_logits64(anchors, positives, tau), dim=1).diagonal()
    factor = 1 / (1 - p_positive)  # (B,)
    # row i of the anchors' gradient comes from row i of the logits only
    torch.testing.assert_close(flatnce, infonce * factor[:, None], rtol=1e-4, atol=1e-7)
    # a reweighting of rows, not one scale (which Adam would cancel): the factors differ several-fold
    assert factor.max() / factor.min() > 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_infonce_gradient_is_exact_at_loss_1e_4_and_loses_only_the_pull_where_the_loss_is_0(seed):
    anchors, positives = _pairs(seed=seed)
    exact = _gradient64(_infonce64, anchors, positives, 0.08)
    loss, fp32 = _library_gradient(InfoNCELoss, anchors, positives, 0.08)
    assert 1e-4 < loss < 1e-3
    assert _cosine(fp32, exact) > 0.99999  # not rounding noise: the float64 gradient, to 5 digits

    # τ = 0.04: log(1 + ξ) < half an fp32 spacing at s_t ≈ 24, so the loss rounds to exactly 0.0 ...
    loss, fp32 = _library_gradient(InfoNCELoss, anchors, positives, 0.04)
    assert loss == 0.0
    exact = _gradient64(_infonce64, anchors, positives, 0.04)
    assert _cosine(fp32, exact) < 0.95
    # ... and what is left is exactly the negatives' push: p_t rounded to 1, the pull (1 - p_t) to 0
    assert _cosine(fp32, _gradient64(_push_only64, anchors, positives, 0.04)) > 0.99999
    logits = _logits64(anchors, positives, 0.04).float().requires_grad_()
    loss, _ = InfoNCELoss(temperature=0.04).compute_loss_from_logits(logits, torch.arange(16))
    (per_logit,) = torch.autograd.grad(loss, logits)
    assert torch.all(per_logit.diagonal() == 0.0) and torch.all(per_logit.fill_diagonal_(1.0) > 0)

    # FlatNCE keeps the full gradient there: its pull is -1 per row whatever p_t
    flat_exact = _gradient64(_flatnce64, anchors, positives, 0.04)
    _, flat_fp32 = _library_gradient(FlatNCELoss, anchors, positives, 0.04)
    assert _cosine(flat_fp32, flat_exact) > 0.99999


def _flatnce64(logits: torch.Tensor) -> torch.Tensor:
    negatives = logits.masked_fill(torch.eye(logits.size(0), dtype=torch.bool), float("-inf"))
    return (torch.logsumexp(negatives, dim=1) - logits.diagonal()).mean()
