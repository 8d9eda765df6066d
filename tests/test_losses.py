"""InfoNCE and FlatNCE against hand computations and against the formulas that define them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simcse_flat.losses import LOSSES, FlatNCELoss, InfoNCELoss, build_loss, loss_class

TAU = 0.05


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_infonce_matches_hand_computed():
    # two anchors, two candidates, cosines written out: s = cos / tau
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    positive = torch.tensor([0, 1])
    c = 1 / math.sqrt(2)
    s = [[1 / TAU, c / TAU], [0.0, c / TAU]]
    expected = (
        -math.log(math.exp(s[0][0]) / (math.exp(s[0][0]) + math.exp(s[0][1])))
        - math.log(math.exp(s[1][1]) / (math.exp(s[1][0]) + math.exp(s[1][1])))
    ) / 2
    loss, metrics = InfoNCELoss(temperature=TAU)(anchors, candidates, positive)
    # absolute tolerance: logsumexp(s) - s_t subtracts two numbers near 20 in fp32 (spacing 2e-6), so a loss
    # of 0.0014 keeps only ~3 significant digits -- the rounding problem FlatNCE was designed around
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["accuracy"].item() == 1.0


def test_flatnce_matches_hand_computed():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    positive = torch.tensor([0, 1])
    c = 1 / math.sqrt(2)
    # row 0: s = (20, c*20, 0), positive 0 -> log(e^{c*20} + e^0) - 20
    row0 = math.log(math.exp(c / TAU) + 1.0) - 1 / TAU
    # row 1: s = (0, c*20, -20), positive 1 -> log(e^0 + e^{-20}) - c*20
    row1 = math.log(1.0 + math.exp(-1 / TAU)) - c / TAU
    loss, metrics = FlatNCELoss(temperature=TAU)(anchors, candidates, positive)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # negative values are normal for FlatNCE: here the positives win clearly
    assert loss.item() < 0
    # the InfoNCE of the same logits is log(1 + xi), and xi = exp(flatnce) row by row
    infonce = (math.log1p(math.exp(row0)) + math.log1p(math.exp(row1))) / 2
    assert metrics["infonce"].item() == pytest.approx(infonce, abs=1e-5)  # fp32 cancellation, as above
    assert metrics["flatnce"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_flatnce_gradient_equals_xi_over_stopgrad_xi():
    torch.manual_seed(0)
    anchors = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    positive = torch.arange(6)
    loss, _ = FlatNCELoss(temperature=0.1)(anchors, candidates, positive)
    grads = torch.autograd.grad(loss, (anchors, candidates))

    # the defining form: mean_i xi_i / sg(xi_i), xi_i = sum_{j != t} exp(s_ij - s_it)
    a2 = anchors.detach().clone().requires_grad_(True)
    c2 = candidates.detach().clone().requires_grad_(True)
    s = F.normalize(a2, dim=-1) @ F.normalize(c2, dim=-1).T / 0.1
    s_pos = s[torch.arange(6), positive]
    mask = torch.ones_like(s, dtype=torch.bool)
    mask[torch.arange(6), positive] = False
    xi = (torch.exp(s - s_pos[:, None]) * mask).sum(1)
    reference = (xi / xi.detach()).mean()
    ref_grads = torch.autograd.grad(reference, (a2, c2))
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)


def test_flatnce_gradient_matches_finite_differences():
    torch.manual_seed(1)
    anchors = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(5, 4, dtype=torch.float64)
    loss_fn = FlatNCELoss(temperature=0.5)
    # the loss works in fp32 (by design, even for fp64 inputs), so the check uses fp32-sized steps and tolerances
    assert torch.autograd.gradcheck(
        lambda a: loss_fn(a, candidates, torch.tensor([0, 1, 2]))[0].double(), (anchors,), eps=1e-3, atol=2e-3, rtol=1e-2
    )


@pytest.mark.parametrize("loss_name", ["infonce", "flatnce"])
def test_losses_are_fp32_and_finite_at_low_temperature_under_autocast(loss_name):
    torch.manual_seed(0)
    anchors = torch.randn(8, 16).bfloat16()
    candidates = torch.randn(8, 16).bfloat16()
    loss_fn = build_loss(loss_name, temperature=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = loss_fn(anchors, candidates, torch.arange(8))
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # the same numbers in fp32 without autocast: the loss does its math in fp32 either way
    reference, _ = loss_fn(anchors.float(), candidates.float(), torch.arange(8))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_flatnce_keeps_a_gradient_where_infonce_underflows():
    # positives far ahead of every negative: InfoNCE's loss and gradient round to 0 in fp32, FlatNCE's do not
    anchors = torch.eye(4, requires_grad=True)
    candidates = torch.eye(4) + 0.0
    positive = torch.arange(4)
    infonce, _ = InfoNCELoss(temperature=0.01)(anchors, candidates, positive)
    (g_info,) = torch.autograd.grad(infonce, anchors)
    flat, _ = FlatNCELoss(temperature=0.01)(anchors, candidates, positive)
    (g_flat,) = torch.autograd.grad(flat, anchors)
    assert infonce.item() == 0.0 and g_info.abs().max().item() < 1e-30  # e^-100: denormal at best
    assert g_flat.abs().max().item() > 1.0


@pytest.mark.parametrize("weight", [1.5, 1.0])
def test_hard_negative_weight_is_added_to_the_own_hard_negative_logit(weight):
    torch.manual_seed(0)
    anchors, candidates = torch.randn(2, 4), torch.randn(4, 4)
    loss_fn = InfoNCELoss(temperature=0.1, hard_negative_weight=weight)
    plain = InfoNCELoss(temperature=0.1).logits(anchors, candidates)
    weighted = loss_fn.logits(anchors, candidates, hard_negative_index=torch.tensor([2, 3]))
    expected = plain.clone()
    expected[0, 2] += weight
    expected[1, 3] += weight
    torch.testing.assert_close(weighted, expected)
    # without hard negatives (unsupervised data) the weight has nothing to act on
    torch.testing.assert_close(loss_fn.logits(anchors, candidates), plain)


def test_every_loss_logs_the_shared_metrics_of_its_logits():
    """infonce / flatnce / accuracy / positive_logit of the logits, by hand, whatever the loss."""
    torch.manual_seed(3)
    anchors, candidates, positive = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([4, 0, 2])
    for loss_fn in (InfoNCELoss(temperature=0.2), FlatNCELoss(temperature=0.2)):
        _, metrics = loss_fn(anchors, candidates, positive)
        logits = (F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T / 0.2).double()
        s_pos = logits[torch.arange(3), positive]
        others = logits.masked_fill(F.one_hot(positive, 5).bool(), float("-inf"))
        expected = {
            "infonce": (torch.logsumexp(logits, 1) - s_pos).mean(),
            "flatnce": (torch.logsumexp(others, 1) - s_pos).mean(),
            "accuracy": (logits.argmax(1) == positive).double().mean(),
            "positive_logit": s_pos.mean(),
            "rows_without_negatives": torch.tensor(0.0),  # every row has a negative (tests/test_duplicates.py)
        }
        assert set(metrics) == set(expected)
        for key, value in expected.items():
            assert metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key



def test_the_shared_metrics_of_a_batch_with_one_row_kept_are_that_rows():
    from simcse_flat.losses.base import logit_metrics

    inf = float("-inf")  # rows 1 and 2 have their positive only (their other candidates masked as duplicates)
    logits = torch.tensor([[2.0, 0.5, -1.0], [inf, 1.0, inf], [inf, inf, 3.0]])
    metrics = logit_metrics(logits, torch.tensor([0, 1, 2]))
    assert metrics["infonce"].item() == pytest.approx(math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)) - 2.0)
    assert metrics["flatnce"].item() == pytest.approx(math.log(math.exp(0.5) + math.exp(-1.0)) - 2.0)
    assert (metrics["accuracy"].item(), metrics["positive_logit"].item()) == (1.0, 2.0)
    assert metrics["rows_without_negatives"].item() == pytest.approx(2 / 3)

def test_exclude_index_removes_the_anchor_itself():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    loss_fn = InfoNCELoss(temperature=0.5)
    logits = loss_fn.logits(x, x, exclude_index=torch.arange(4))
    assert torch.isinf(logits.diagonal()).all()
    loss, _ = loss_fn(x, x, torch.tensor([1, 0, 3, 2]), exclude_index=torch.arange(4))
    assert torch.isfinite(loss)


def test_unknown_loss_names_the_closest():
    choices = f"unknown loss {{name!r}}; choose one of {sorted(LOSSES)}."
    with pytest.raises(ValueError) as close:
        loss_class("flatnc")
    assert str(close.value) == choices.format(name="flatnc") + " Did you mean 'flatnce'?"
    with pytest.raises(ValueError) as far:
        loss_class("zzz")
    assert str(far.value) == choices.format(name="zzz")  # nothing close: no hint


def test_config_dicts_hold_every_setting_the_model_card_shows():
    defaults = {"temperature": 0.05, "hard_negative_weight": 0.0}
    assert build_loss("infonce").get_config_dict() == {"loss": "infonce", **defaults}
    assert build_loss("dcl").get_config_dict() == {"loss": "dcl", **defaults}  # no weight_sigma: plain DCL
    assert build_loss("sogclr", dataset_size=4).get_config_dict() == {"loss": "sogclr", **defaults, "gamma": 0.9}
    assert build_loss("emc2", dataset_size=4, seed=7).get_config_dict() == {
        "loss": "emc2", **defaults, "seed": 7, "kernel": "official_scan", "estimator": "refresh"  # no proposal count
    }
    settings = {"temperature": 0.1, "hard_negative_weight": 0.3}
    for name in LOSSES:
        config = build_loss(name, dataset_size=4, **settings).get_config_dict()
        assert {key: config[key] for key in settings} == settings, name
    paper = build_loss("emc2", dataset_size=4, proposals=1, kernel="paper").get_config_dict()
    assert (paper["kernel"], paper["proposals"]) == ("paper", 1)


def test_one_candidate_is_refused():
    with pytest.raises(ValueError, match=r"^a contrastive loss needs at least 2 candidates \(batch size >= 2\)$"):
        InfoNCELoss()(torch.randn(1, 3), torch.randn(1, 3), torch.tensor([0]))


def test_an_input_the_loss_does_not_take_is_an_error():
    with pytest.raises(TypeError, match="chain_negatives"):
        InfoNCELoss()(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2), chain_negatives=torch.randn(2, 3))
    with pytest.raises(TypeError, match="weights"):
        InfoNCELoss()(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2), weights=torch.ones(2),
                      chain_negatives=torch.randn(2, 3))  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    with pytest.raises(ValueError, match=rf"^temperature must be > 0, got {temperature}$"):
        InfoNCELoss(temperature=temperature)


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_refused(rank, world_size):
    message = rf"^rank must be in \[0, world_size\), got rank={rank}, world_size={world_size}$"
    with pytest.raises(ValueError, match=message):
        InfoNCELoss(rank=rank, world_size=world_size)
    InfoNCELoss(rank=max(world_size - 1, 0), world_size=max(world_size, 1))  # the last rank is in
