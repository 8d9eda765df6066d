"""DCL: hand-computed values, its identity with FlatNCE, and DCLW's weighting as the paper writes it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simcse_flat.losses import LOSSES, DCLLoss, EMC2Loss, FlatNCELoss, SogCLRLoss, build_loss

TAU = 0.1


def _scores(anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return F.normalize(anchors.double(), dim=-1) @ F.normalize(candidates.double(), dim=-1).T / TAU


def test_dcl_matches_hand_computed():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    c = 1 / math.sqrt(2)
    # row 0: s = (10, 10c, 0), positive 0 -> -10 + log(e^{10c} + e^0)
    row0 = -1 / TAU + math.log(math.exp(c / TAU) + 1.0)
    # row 1: s = (0, 10c, -10), positive 1 -> -10c + log(e^0 + e^{-10})
    row1 = -c / TAU + math.log(1.0 + math.exp(-1 / TAU))
    loss, _ = DCLLoss(temperature=TAU)(anchors, candidates, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)


@pytest.mark.parametrize("hard_negatives", [False, True])
def test_dcl_without_weighting_equals_flatnce_in_value_and_gradient(hard_negatives):
    # the relation is an identity: logsumexp over j != t minus s_t, for any candidates, hard negatives included;
    # both are checked against that formula written out here, not only against each other
    torch.manual_seed(0)
    anchors = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(10 if hard_negatives else 5, 8, dtype=torch.float64, requires_grad=True)
    extra = {"hard_negative_index": torch.arange(5, 10)} if hard_negatives else {}
    s = _scores(anchors, candidates)
    if hard_negatives:
        s = s + 0.3 * torch.cat([torch.zeros(5, 5), torch.eye(5)], dim=1)  # on anchor i's own hard negative, 5 + i
    positive = torch.eye(5, s.size(1), dtype=torch.bool)
    reference = (torch.logsumexp(s.masked_fill(positive, float("-inf")), dim=1) - s.diagonal()).mean()
    reference_grads = torch.autograd.grad(reference, (anchors, candidates))
    for loss_fn in (DCLLoss(TAU, hard_negative_weight=0.3), FlatNCELoss(TAU, hard_negative_weight=0.3)):
        loss, _ = loss_fn(anchors, candidates, torch.arange(5), **extra)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5), loss_fn.name
        for ours, expected in zip(torch.autograd.grad(loss, (anchors, candidates)), reference_grads):
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_dclw_weights_and_gradient_follow_the_paper():
    torch.manual_seed(1)
    sigma = 0.5
    anchors = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    loss, metrics = DCLLoss(TAU, weight_sigma=sigma)(anchors, candidates, torch.arange(6))
    grads = torch.autograd.grad(loss, (anchors, candidates))

    # w_i = 2 - exp(cos_i / σ) / mean_k exp(cos_k / σ); ℓ_i = -w_i s_ii + logsumexp_{j != i} s_ij; w not detached
    s = _scores(anchors, candidates)
    cos = s.diagonal() * TAU
    w = 2 - torch.exp(cos / sigma) / torch.exp(cos / sigma).mean()
    negatives = torch.logsumexp(s.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf")), dim=1)
    reference = (-w * s.diagonal() + negatives).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    weights = DCLLoss(TAU, weight_sigma=sigma).positive_weights(cos)  # the loss's own weights against the paper's
    torch.testing.assert_close(weights, w)
    assert weights.mean().item() == pytest.approx(1.0) and weights[cos.argmax()] == weights.min()
    assert metrics["dcl_weight_min"].item() == pytest.approx(w.min().item(), rel=1e-5)
    assert metrics["dcl_weight_max"].item() == pytest.approx(w.max().item(), rel=1e-5)
    for ours, ref in zip(grads, torch.autograd.grad(reference, (anchors, candidates))):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_dclw_with_equally_aligned_positives_is_dcl():
    # every positive pair at the same cosine: all weights are 1 and DCLW is DCL
    anchors = torch.eye(4)
    candidates = torch.eye(4) * 2.0 + torch.roll(torch.eye(4), 1, dims=1)  # cos(a_i, c_i) = 2/sqrt(5) for every i
    weighted, _ = DCLLoss(TAU, weight_sigma=0.5)(anchors, candidates, torch.arange(4))
    plain, _ = DCLLoss(TAU)(anchors, candidates, torch.arange(4))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


def test_new_losses_are_registered_by_name():
    assert LOSSES["dcl"] is DCLLoss and LOSSES["sogclr"] is SogCLRLoss and LOSSES["emc2"] is EMC2Loss
    dcl = build_loss("dcl", dataset_size=100, weight_sigma=0.5)  # dataset_size is ignored by a stateless loss
    assert isinstance(dcl, DCLLoss) and dcl.weight_sigma == 0.5 and dcl.get_config_dict()["weight_sigma"] == 0.5
    assert build_loss("dcl").weight_sigma is None and build_loss("dcl").temperature == 0.05
    for name, cls in (("sogclr", SogCLRLoss), ("emc2", EMC2Loss)):
        loss_fn = build_loss(name, dataset_size=7)
        assert isinstance(loss_fn, cls) and cls.needs_dataset_size and loss_fn.temperature == 0.05
        assert loss_fn.citation.startswith("@inproceedings")
    with pytest.raises(ValueError, match="weight_sigma"):
        DCLLoss(weight_sigma=0.0)
