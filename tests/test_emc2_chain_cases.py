"""EMC²'s chain bookkeeping on hand-built cases whose outcome is certain (acceptance probabilities of e^±50).

The statistical tests (``test_emc2.py``, ``test_emc2_kernels.py``) check the law the chains settle on; these check
the single-step details a law cannot see: which score stands for a chain's out-of-batch negative, which anchors
count as used, what the logged metrics are, and what happens to an anchor that has no negative to propose.
"""

from __future__ import annotations

import math

import pytest
import torch

from simcse_flat.losses import EMC2Loss
from simcse_flat.samples import POSITIVE

TAU = 0.01  # cos 1 -> logit 100, cos 0.5 -> 50, cos 0 -> 0


def _unit(*vectors) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)


# four orthogonal directions and one at 60 degrees to e0 (cos 0.5)
E0, E1, E2, E3 = _unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]).split(1)  # rows of (1, 4)
HALF = _unit([1, 3**0.5, 0, 0])


def _loss_with_chains(states: list[int], stored: list[float], **kwargs) -> EMC2Loss:
    loss_fn = EMC2Loss(dataset_size=10, temperature=TAU, kernel="paper", **kwargs)
    loss_fn.sampler.negative_ids[[3, 4]] = torch.tensor(states)
    loss_fn.sampler.log_scores[[3, 4]] = torch.tensor(stored)
    return loss_fn


def test_a_chain_negative_out_of_the_batch_is_scored_by_its_fresh_encoding():
    """Anchors 3 and 4 hold samples 0 and 6 (out of the batch, 0 the first id) with stale stored scores of -50;
    freshly encoded, each scores 100 against its anchor. The one proposal (the other anchor's positive, logit 0) is
    then rejected with probability 1 - e^-100; scored by the stale -50 it would be accepted with certainty."""
    loss_fn = _loss_with_chains([0, 6], [-50.0, -50.0])
    table = {0: E0[0], 6: E1[0]}  # what encode_samples returns for a sample's positive view
    seen = []

    def encode_samples(request):
        assert (request.view == POSITIVE).all()
        seen.append(request.ids.tolist())
        return torch.stack([table[int(s)] for s in request.ids])

    anchors, positives = torch.cat([E0, E1]), torch.cat([E2, E3])  # the positives are orthogonal to both anchors
    inputs = loss_fn.inputs_for_step(encode_samples)
    loss, metrics = loss_fn(anchors, positives, torch.arange(2), anchor_ids=torch.tensor([3, 4]),
                            candidate_ids=torch.tensor([3, 4]), **inputs)  # fmt: skip
    assert seen == [[0, 6]]  # the chains' own negatives were encoded, sample 0 included
    assert metrics["emc2_acceptance"].item() == 0.0
    assert loss_fn.sampler.negative_ids[[3, 4]].tolist() == [0, 6]  # both chains kept their negative
    assert metrics["emc2_used"].item() == 1.0  # both anchors have a negative, sample 0's anchor too
    assert metrics["emc2_negative_logit"].item() == pytest.approx(100.0, rel=1e-4)  # the mean over used anchors
    assert metrics["emc2_encoded"].item() == 1.0  # every anchor's chain negative was encoded
    # the loss: mean over anchors of s(x, Z) - s(x, positive) = 100 - 0
    assert loss.item() == pytest.approx(100.0, rel=1e-4)
    assert loss_fn.sampler.log_scores[[3, 4]].tolist() == pytest.approx([100.0, 100.0], rel=1e-4)


def test_without_fresh_encodings_an_anchor_whose_negative_left_the_batch_is_not_used():
    """``refresh_negatives`` off: anchor 3's chain (stale score -50) accepts the in-batch proposal, logit 50; anchor
    4's (stale score +50) rejects its proposal, logit 0, and keeps a negative nobody encoded: it is not used, and the
    metric averages over anchor 3 alone."""
    loss_fn = _loss_with_chains([7, 6], [-50.0, 50.0], refresh_negatives=False)
    assert loss_fn.inputs_for_step(lambda states: None) == {}
    anchors, positives = torch.cat([E0, E1]), torch.cat([E3, HALF])  # anchor 3 sees anchor 4's positive at cos 0.5
    _, metrics = loss_fn(anchors, positives, torch.arange(2), anchor_ids=torch.tensor([3, 4]),
                         candidate_ids=torch.tensor([3, 4]))  # fmt: skip
    assert loss_fn.sampler.negative_ids[[3, 4]].tolist() == [4, 6]
    assert metrics["emc2_acceptance"].item() == 0.5
    assert metrics["emc2_used"].item() == 0.5
    assert metrics["emc2_negative_logit"].item() == pytest.approx(50.0, rel=1e-4)
    assert metrics["emc2_encoded"].item() == 0.0  # nothing was encoded


def test_an_anchor_with_no_negative_to_propose_keeps_an_empty_chain():
    """Batch of two whose candidates are both the anchor's duplicates or its positive: nothing to propose."""
    loss_fn = EMC2Loss(dataset_size=10, temperature=0.1, kernel="paper")
    anchors, positives = torch.cat([E0, E1]), torch.cat([E0, E1])
    duplicates = torch.tensor([[False, True], [True, False]])  # each anchor's other column: the same text
    _, metrics = loss_fn(anchors, positives, torch.arange(2), anchor_ids=torch.tensor([3, 4]),
                         candidate_ids=torch.tensor([3, 4]), duplicate_mask=duplicates)  # fmt: skip
    assert loss_fn.sampler.negative_ids[[3, 4]].tolist() == [-1, -1]
    assert metrics["emc2_used"].item() == 0.0 and metrics["emc2_acceptance"].item() == 0.0


def test_ids_are_required_and_the_error_says_which():
    loss_fn = EMC2Loss(dataset_size=10)
    message = r"^EMC2Loss keeps one chain per data-set sample: pass anchor_ids and candidate_ids$"
    for ids in ({"anchor_ids": torch.tensor([3, 4])}, {"candidate_ids": torch.tensor([3, 4])}):
        with pytest.raises(ValueError, match=message):
            loss_fn(torch.cat([E0, E1]), torch.cat([E2, E3]), torch.arange(2), **ids)


@pytest.mark.parametrize("samples, expected", [(4, math.log(99 / 3)), (1, math.log(99))])
def test_the_own_hard_negative_correction_is_the_proposal_ratio(samples, expected):
    """log((m - 1) / (B - 1)) for B samples in the batch (hard negatives, ids -1 - j, do not count); B = 1 has no
    other sample and counts as 1."""
    loss_fn = EMC2Loss(dataset_size=100)
    ids = torch.arange(samples)
    assert loss_fn._own_hard_negative_correction(torch.cat([ids, -1 - ids])) == pytest.approx(expected)


def test_the_sampler_state_restores_its_seed():
    saved = EMC2Loss(dataset_size=10, seed=7)
    restored = EMC2Loss(dataset_size=10, seed=0)
    restored.load_state_dict(saved.state_dict())
    assert restored.sampler.seed == 7 and restored.get_config_dict()["seed"] == 7
    assert torch.equal(restored.sampler.generator.get_state(), saved.sampler.generator.get_state())


def test_a_chain_negative_masked_out_of_the_batch_is_scored_as_out_of_the_batch():
    """Anchor 3's chain holds sample 4 and anchor 4's holds sample 3: both in the batch, but each is the other
    anchor's duplicate (masked, logit -inf), so neither column may stand for the chain's negative: its fresh
    encoding does (cos 0.5, logit 50), and the loss stays finite."""
    loss_fn = _loss_with_chains([4, 3], [-50.0, -50.0])
    table = {4: HALF[0], 3: _unit([3**0.5, 1, 0, 0])[0]}  # cos 0.5 with anchor 3 (E0) and with anchor 4 (E1)
    inputs = loss_fn.inputs_for_step(lambda request: torch.stack([table[int(s)] for s in request.ids]))
    duplicates = torch.tensor([[False, True], [True, False]])
    loss, metrics = loss_fn(torch.cat([E0, E1]), torch.cat([E2, E3]), torch.arange(2), anchor_ids=torch.tensor([3, 4]),
                            candidate_ids=torch.tensor([3, 4]), duplicate_mask=duplicates, **inputs)  # fmt: skip
    assert metrics["emc2_used"].item() == 1.0
    assert metrics["emc2_negative_logit"].item() == pytest.approx(50.0, rel=1e-4)
    assert loss.item() == pytest.approx(50.0, rel=1e-4)


def test_settings_out_of_range_are_refused_with_their_reason():
    cases = [
        ({"proposals": 0}, r"^EMC² needs at least one proposal per anchor and step, got 0$"),
        ({"kernel": "scan"}, r"^EMC² kernel must be one of \('paper', 'official_scan'\), got 'scan'$"),
        ({"proposals": 3}, r"^proposals is the paper kernel's; the official_scan kernel offers every column once$"),
        ({"dataset_size": 1}, r"^MCMC negative sampling needs a data set of at least 2 samples, got 1$"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            EMC2Loss(**{"dataset_size": 10, **settings})
    assert EMC2Loss(dataset_size=2).sampler.dataset_size == 2  # two samples: each the other's negative
    paper = EMC2Loss(dataset_size=10, kernel="paper")
    assert paper.proposals == 1 and paper.get_config_dict()["proposals"] == 1  # the paper's one proposal a step


def _all_views_step(kernel: str, seed: int = 0) -> float:
    """One step on SimCLR's candidates for view 0 of samples 3 and 4: [view 0 of 3, of 4, view 1 of 3, of 4],
    each anchor's own view 0 excluded and its view 1 the positive. Anchor 3 sees sample 4 twice: view 0 at logit 50,
    view 1 at 90; anchor 4 sees sample 3 at 50 in both views. Returns the mean chain-negative logit."""
    loss_fn = EMC2Loss(dataset_size=10, temperature=TAU, kernel=kernel, seed=seed)
    far_view = _unit([0.9, (1 - 0.81) ** 0.5, 0, 0])  # cos 0.9 with anchor 3's view 0
    candidates = torch.cat([E0, HALF, E0, far_view])
    _, metrics = loss_fn(torch.cat([E0, HALF]), candidates, torch.tensor([2, 3]), exclude_index=torch.tensor([0, 1]),
                         anchor_ids=torch.tensor([3, 4]), candidate_ids=torch.tensor([3, 4, 3, 4]))  # fmt: skip
    return metrics["emc2_negative_logit"].item()


def test_the_scan_offers_every_column_and_the_paper_kernel_every_sample_once():
    """The official scan offers both of sample 4's views (empty chain: accept view 0 at 50, then view 1 at 90, the
    state recorded after the first half: 90) -> (90 + 50) / 2. The paper kernel proposes a *sample* uniformly, one
    column per sample (its first, view 0), so anchor 3 holds sample 4 at 50 whatever the draws."""
    assert _all_views_step("official_scan") == pytest.approx(70.0, rel=1e-4)
    assert [_all_views_step("paper", seed) for seed in range(8)] == pytest.approx([50.0] * 8, rel=1e-4)
