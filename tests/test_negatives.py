"""The candidate set of two-view data: SimCLR's NT-Xent (``all_views``, 2B-2 negatives) and SimCSE's ``cross_view``.

References are written out in float64 from the papers' definitions, one view at a time: NT-Xent (SimCLR, Chen et
al. 2020, eq. 1) and FlatCLR (FlatNCE on SimCLR's candidates: log-sum-exp of the 2B-2 negatives minus the positive).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simcse_flat.losses import build_loss
from simcse_flat.views import contrastive_loss_on_views

TAU = 0.5


def _angles(*degrees: float) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


# three images, two views each (view-major rows, as the collator lays them out): 2-d unit vectors at these angles
VIEW0, VIEW1 = (0.0, 100.0, 200.0), (30.0, 150.0, 190.0)


def _by_hand(flat: bool) -> float:
    """Mean over the 2B = 6 views of NT-Xent (or FlatCLR), each view against the 5 others, in float64."""
    views = _angles(*VIEW0, *VIEW1)
    batch, total = len(VIEW0), 0.0
    for k in range(2 * batch):
        positive = (k + batch) % (2 * batch)
        s = {j: float(views[k] @ views[j]) / TAU for j in range(2 * batch) if j != k}
        denominator = sum(math.exp(v) for j, v in s.items() if not (flat and j == positive))
        total += math.log(denominator) - s[positive]
    return total / (2 * batch)


@pytest.mark.parametrize("loss_name, flat", [("infonce", False), ("flatnce", True)], ids=["nt-xent", "flatclr"])
def test_all_views_is_nt_xent_and_flatclr_by_hand(loss_name, flat):
    embeddings = _angles(*VIEW0, *VIEW1).float()
    loss, _ = contrastive_loss_on_views(build_loss(loss_name, temperature=TAU), embeddings, torch.arange(3),
                                        negatives="all_views")  # fmt: skip
    assert loss.item() == pytest.approx(_by_hand(flat), rel=1e-6)
    # cross_view (CLIP's two directions, B-1 negatives each) is a different number on the same batch
    cross, _ = contrastive_loss_on_views(build_loss(loss_name, temperature=TAU), embeddings, torch.arange(3),
                                         symmetric=True)  # fmt: skip
    assert abs(cross.item() - loss.item()) > 0.1


@pytest.mark.parametrize("loss_name", ["infonce", "flatnce", "dcl"])
def test_all_views_gradient_matches_the_float64_definition(loss_name):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2 * 5, 4, generator=generator, dtype=torch.float64)
    leaf = embeddings.float().requires_grad_()
    loss, _ = contrastive_loss_on_views(build_loss(loss_name, temperature=0.2), leaf, torch.arange(5),
                                        negatives="all_views")  # fmt: skip
    (got,) = torch.autograd.grad(loss, leaf)

    exact_leaf = embeddings.clone().requires_grad_()
    unit = F.normalize(exact_leaf, dim=-1)
    logits = (unit @ unit.T / 0.2).masked_fill(torch.eye(10, dtype=torch.bool), float("-inf"))  # no self-pair
    positive = torch.arange(10).roll(5)
    s_pos = logits.gather(1, positive[:, None]).squeeze(1)
    if loss_name != "infonce":  # FlatNCE = DCL: the positive leaves the log-sum-exp too
        logits = logits.scatter(1, positive[:, None], float("-inf"))
    (expected,) = torch.autograd.grad((torch.logsumexp(logits, 1) - s_pos).mean(), exact_leaf)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_all_views_refuses_three_views_and_unknown_names():
    loss_fn = build_loss("infonce")
    with pytest.raises(ValueError, match="two views"):
        contrastive_loss_on_views(loss_fn, torch.randn(9, 4), torch.arange(3), negatives="all_views")
    with pytest.raises(ValueError, match="cross_view"):
        contrastive_loss_on_views(loss_fn, torch.randn(6, 4), torch.arange(3), negatives="all_view")


def test_stateful_losses_take_all_views():
    """SogCLR and EMC² run on the 2B-2 candidates, anchors of either view keeping one state."""
    embeddings = torch.randn(2 * 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for name in ("sogclr", "emc2"):
        loss_fn = build_loss(name, dataset_size=10, temperature=0.2)
        loss, metrics = contrastive_loss_on_views(loss_fn, embeddings, torch.tensor([0, 3, 5, 9]),
                                                  negatives="all_views")  # fmt: skip
        loss.backward()
        assert torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 1
    assert torch.isfinite(embeddings.grad).all()


def test_config_names_the_candidate_sets():
    from simcse_flat.config import ConfigError, parse_config

    assert parse_config(["--negatives", "all_views"]).loss.negatives == "all_views"
    with pytest.raises(ConfigError, match="negatives"):
        parse_config(["--negatives", "both"])


def test_cross_view_is_one_direction_unless_symmetric_and_symmetric_averages_both():
    """SimCSE scores view 0 against view 1 only (the default); ``symmetric`` averages that with the mirrored
    direction, the loss and every metric."""
    generator = torch.Generator().manual_seed(2)
    view0, view1 = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    loss_fn, ids = build_loss("infonce", temperature=0.1), torch.arange(4)
    logits = F.normalize(view0, dim=-1) @ F.normalize(view1, dim=-1).T / 0.1
    one_way, forward = contrastive_loss_on_views(loss_fn, torch.cat([view0, view1]), ids)
    assert one_way.item() == pytest.approx(F.cross_entropy(logits, ids).item(), rel=1e-5)  # by hand: one direction
    _, mirrored = contrastive_loss_on_views(loss_fn, torch.cat([view1, view0]), ids)
    both, metrics = contrastive_loss_on_views(loss_fn, torch.cat([view0, view1]), ids, symmetric=True)
    assert both.item() == pytest.approx((F.cross_entropy(logits, ids) + F.cross_entropy(logits.T, ids)).item() / 2)
    assert forward.keys() == metrics.keys()
    for key in metrics:
        assert metrics[key].item() == pytest.approx((forward[key] + mirrored[key]).item() / 2, abs=1e-6), key
    assert any(abs(forward[key].item() - mirrored[key].item()) > 1e-3 for key in metrics)  # the average is not either


def test_view_count_errors_say_what_was_given():
    from simcse_flat.views import split_views

    with pytest.raises(ValueError, match=r"^7 rows are not a whole number of views of 3 examples$"):
        split_views(torch.randn(7, 2), 3)
    with pytest.raises(ValueError, match=r"^expected 2 or 3 views, got 4$"):
        contrastive_loss_on_views(build_loss("infonce"), torch.randn(8, 2), torch.arange(2))
    with pytest.raises(ValueError, match=r"^negatives: all_views takes two views a sample; supervised triples use "):
        contrastive_loss_on_views(build_loss("infonce"), torch.randn(6, 2), torch.arange(2), negatives="all_views")
    with pytest.raises(ValueError, match=r"^negatives must be one of \('cross_view', 'all_views'\), got 'x'$"):
        contrastive_loss_on_views(build_loss("infonce"), torch.randn(4, 2), torch.arange(2), negatives="x")


def test_triples_give_the_loss_each_hard_negative_as_a_column_and_an_id_of_its_own():
    """Candidates of (anchor, positive, hard negative) triples: the positives, then the hard negatives; a hard negative
    is another sentence of its sample, so its id is ``-1 - index`` (never a sample's id) and its column is
    ``B + i`` for anchor ``i``."""
    loss_fn, seen = build_loss("infonce"), {}
    real_forward = loss_fn.forward

    def recording_forward(anchors, candidates, positive_index, **kwargs):
        seen.update(kwargs, positive_index=positive_index, candidates=candidates.size(0))
        return real_forward(anchors, candidates, positive_index, **kwargs)

    loss_fn.forward = recording_forward
    contrastive_loss_on_views(loss_fn, torch.randn(9, 2), torch.tensor([4, 0, 7]))
    assert seen["candidates"] == 6 and seen["positive_index"].tolist() == [0, 1, 2]
    assert seen["hard_negative_index"].tolist() == [3, 4, 5]
    assert seen["candidate_ids"].tolist() == [4, 0, 7, -5, -1, -8]
