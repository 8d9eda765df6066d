"""EMC²'s ``stored`` estimator (the official code's): the MH test reads the stored score, and only the anchors whose
out-of-batch start is still held in the recorded part of the step are encoded, after the step. Hand-built cases
whose outcome is certain (acceptance probabilities of e^±50), as ``test_emc2_chain_cases.py``."""

from __future__ import annotations

import pytest
import torch

from simcse_flat.config import ConfigError, parse_config
from simcse_flat.losses import EMC2Loss, build_loss_from_settings
from simcse_flat.samples import POSITIVE

TAU = 0.01  # cos 1 -> logit 100, cos 0.5 -> 50, cos 0 -> 0


def _unit(*vectors) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)


E0, E1, E2, E3 = _unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]).split(1)
HALF = _unit([1, 3**0.5, 0, 0])  # cos 0.5 with E0


def _run(kernel: str, chains: dict[int, tuple[int, float]], anchors, positives, ids, table):
    """One call of a ``stored`` loss with the given chains (anchor id -> (state, stored score)); returns the loss,
    its metrics, the states the encoder was asked for and the encoded rows (with gradient)."""
    loss_fn = EMC2Loss(dataset_size=10, temperature=TAU, kernel=kernel, estimator="stored")
    for anchor, (state, score) in chains.items():
        loss_fn.sampler.negative_ids[anchor], loss_fn.sampler.log_scores[anchor] = state, score
    asked, encoded = [], []

    def encode_samples(request):
        assert (request.view == POSITIVE).all()  # unsupervised: a chain holds positive views only
        asked.append(request.ids.tolist())
        rows = torch.stack([table[int(s)] for s in request.ids]).clone().requires_grad_(True)
        encoded.append(rows)
        return rows

    ids = torch.tensor(ids)
    loss, metrics = loss_fn(anchors, positives, torch.arange(len(ids)), anchor_ids=ids, candidate_ids=ids,
                            **loss_fn.inputs_for_step(encode_samples))  # fmt: skip
    return loss_fn, loss, metrics, asked, encoded


def test_the_mh_test_reads_the_stored_score_and_an_accepted_chain_encodes_nothing():
    """Chains hold samples 0 and 6 (out of the batch) with stored scores -50; freshly encoded they would score 100
    and reject the one proposal (logit 0). Read from the store, both accept with certainty: nothing is encoded."""
    loss_fn, loss, metrics, asked, _ = _run("paper", {3: (0, -50.0), 4: (6, -50.0)}, torch.cat([E0, E1]),
                                            torch.cat([E2, E3]), [3, 4], {0: E0[0], 6: E1[0]})  # fmt: skip
    assert asked == []  # no forward pass at all
    assert metrics["emc2_acceptance"].item() == 1.0 and metrics["emc2_encoded"].item() == 0.0
    assert loss_fn.sampler.negative_ids[[3, 4]].tolist() == [4, 3]  # each moved to the other anchor's positive
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_a_held_start_is_encoded_after_the_step_and_carries_the_gradient():
    """Anchor 3's chain (sample 0, stored 150) rejects its proposal and holds sample 0: encoded (cos 0.5 -> 50), its
    stored score left as it was; anchor 4's (stored -50) accepts: not encoded. encoded = 1/2."""
    loss_fn, loss, metrics, asked, encoded = _run("paper", {3: (0, 150.0), 4: (6, -50.0)}, torch.cat([E0, E1]),
                                                  torch.cat([E2, E3]), [3, 4], {0: HALF[0], 6: E1[0]})  # fmt: skip
    assert asked == [[0]]
    assert metrics["emc2_encoded"].item() == 0.5 and metrics["emc2_used"].item() == 1.0
    assert loss.item() == pytest.approx((50.0 + 0.0) / 2, rel=1e-4)  # mean of s(x, Z) - s(x, y)
    assert loss_fn.sampler.log_scores[3].item() == 150.0  # the store is not refreshed
    loss.backward()
    assert encoded[0].grad is not None and encoded[0].grad.abs().sum() > 0


def test_the_first_and_last_ids_encode_their_own_chains_start():
    """Anchors 0 and 9, the first and last ids of 10, hold samples 5 and 6 with stored scores 150: both reject their
    proposal (logit 0) and hold their start, which is encoded: each its own chain's (cos 0.5 -> 50, cos 1 -> 100)."""
    _, loss, metrics, asked, _ = _run("paper", {0: (5, 150.0), 9: (6, 150.0)}, torch.cat([E0, E1]),
                                      torch.cat([E2, E3]), [0, 9], {5: HALF[0], 6: E1[0]})  # fmt: skip
    assert asked == [[5, 6]]
    assert metrics["emc2_encoded"].item() == 1.0
    assert loss.item() == pytest.approx((50.0 + 100.0) / 2, rel=1e-4)


def test_the_scan_encodes_only_starts_held_past_the_burn_in():
    """Three anchors, two proposals each, the second half recorded. Anchor 3 (stored 50) rejects its first proposal
    (logit 0) and accepts the second (100): its start was held during the burn-in only, so it is not encoded.
    Anchor 4 (stored 150) rejects both: encoded. Anchor 5's chain is empty: it accepts its first proposal."""
    anchors, positives = torch.cat([E0, E1, E2]), torch.cat([E2, E3, E0])  # p5 = E0: logit 100 for anchor 3
    loss_fn, _, metrics, asked, _ = _run("official_scan", {3: (7, 50.0), 4: (8, 150.0)}, anchors, positives,
                                         [3, 4, 5], {7: E1[0], 8: HALF[0]})  # fmt: skip
    assert asked == [[8]]
    assert metrics["emc2_encoded"].item() == pytest.approx(1 / 3)
    assert loss_fn.sampler.negative_ids[[3, 4]].tolist() == [5, 8]


def test_the_setting_is_checked_built_and_shown_on_the_card():
    config = parse_config(["--loss", "emc2", "--emc2_estimator", "stored"])
    loss_fn = build_loss_from_settings(config.loss, dataset_size=10)
    assert loss_fn.estimator == "stored" and loss_fn.get_config_dict()["estimator"] == "stored"
    assert config.to_dict()["emc2_estimator"] == "stored"  # config.yaml says it too
    assert build_loss_from_settings(parse_config(["--loss", "emc2"]).loss, dataset_size=10).estimator == "refresh"
    with pytest.raises(ConfigError, match=r"^emc2_estimator must be one of refresh, stored, got 'fresh'"):
        parse_config(["--loss", "emc2", "--emc2_estimator", "fresh"])
    with pytest.raises(ConfigError, match=r"^emc2_estimator stored encodes chain negatives: it needs"):
        parse_config(["--loss", "emc2", "--emc2_estimator", "stored", "--emc2_refresh_negatives", "false"])
    with pytest.raises(ValueError, match=r"^EMC² estimator must be one of"):
        EMC2Loss(dataset_size=4, estimator="fresh")
    with pytest.raises(ValueError, match=r"^the stored estimator encodes chain negatives: it needs refresh_negatives$"):
        EMC2Loss(dataset_size=4, estimator="stored", refresh_negatives=False)
