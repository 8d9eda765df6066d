"""EMC²'s two kernels by name, and supervised hard negatives as chain states.

* ``official_scan`` is the official code's ``mh_step``: every proposable column in column order, the states of
  the second half of the scan recorded (``--mcmc_burn_in 0.5``);
* a supervised batch's hard negatives are states of their own (``m + j``), proposed like any other negative, so
  a chain run long visits them as often as the global softmax over ``{y_j : j != i} ∪ {h_j}`` says.
"""

from __future__ import annotations

import pytest
import torch

from simcse_flat.losses import EMC2Loss
from simcse_flat.losses.emc2_chains import McmcNegativeSampler

from conftest import views_encoder

from test_emc2 import one_thread  # noqa: F401  (autouse: thousands of steps on tiny tensors, one thread)

TAU = 0.3


def test_official_scan_offers_every_column_in_order_and_records_the_second_half():
    # scores rise along the columns, so every proposal is accepted whatever the uniform draw: the chain walks
    # through the proposable columns in order, and the recorded states are the last half of them
    sampler = McmcNegativeSampler(dataset_size=10)
    scores = torch.arange(8, dtype=torch.float32).expand(2, -1).clone()
    proposable = torch.ones(2, 8, dtype=torch.bool)
    proposable[0, [0, 5]] = False  # anchor 0: its own column and its positive
    proposable[1, [1, 6]] = False
    step = sampler.step(scores, proposable, torch.tensor([0, 1]), torch.arange(8) + 2, kernel="official_scan")
    assert step.column.tolist() == [7, 7] and step.acceptance.item() == 1.0
    proposals = [[c for c in range(8) if proposable[r, c]] for r in range(2)]
    expected = torch.zeros(2, 9)
    for r, columns in enumerate(proposals):
        recorded = columns[len(columns) // 2 :]
        expected[r, recorded] = 1 / len(recorded)
    torch.testing.assert_close(step.weights, expected)
    assert sampler.negative_ids[:2].tolist() == [9, 9]  # the state is the candidate's id


def test_paper_kernel_makes_one_proposal_a_step():
    sampler = McmcNegativeSampler(dataset_size=10)
    scores = torch.arange(8, dtype=torch.float32).expand(3, -1).clone()
    step = sampler.step(scores, torch.ones(3, 8, dtype=torch.bool), torch.arange(3), torch.arange(8) + 2)
    assert step.weights[:, :-1].sum(dim=1).tolist() == [1.0, 1.0, 1.0]  # one state each, held the whole step
    assert ((step.weights[:, :-1] > 0).sum(dim=1) == 1).all()


def _supervised_table(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(m, 4, generator=generator)
    positives = anchors + 0.5 * torch.randn(m, 4, generator=generator)
    hard = anchors + 0.8 * torch.randn(m, 4, generator=generator)  # hard negatives: near their own anchor
    return anchors, positives, hard


def test_supervised_chains_visit_hard_negatives_as_the_global_softmax_says():
    # the paper's kernel on NLI-style triples: states y_j (j != i) and every h_j, the own h_i included. h_i is in
    # every batch of anchor i, so it is proposed more often than the rest; Hastings' correction makes up for it
    m, batch, epochs = 6, 3, 800
    anchors, positives, hard = _supervised_table(m)
    states = torch.cat([positives, hard])  # state j: y_j; state m + j: h_j
    loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, kernel="paper")
    visits = torch.zeros(m, 2 * m)
    order = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        for ids in torch.randperm(m, generator=order).split(batch):
            chain_negatives = states[loss_fn.sampler.negatives_to_encode(ids)]
            candidates = torch.cat([positives[ids], hard[ids]])
            loss_fn(anchors[ids], candidates, torch.arange(batch), anchor_ids=ids,
                    candidate_ids=torch.cat([ids, -1 - ids]), hard_negative_index=torch.arange(batch) + batch,
                    chain_negatives=chain_negatives)  # fmt: skip
            if epoch >= 50:
                visits[ids, loss_fn.sampler.negative_ids[ids]] += 1
    scores = loss_fn.logits(anchors, states)  # (m, 2m)
    scores[torch.arange(m), torch.arange(m)] = float("-inf")  # not its own positive
    target = torch.softmax(scores, dim=1)
    empirical = visits / visits.sum(dim=1, keepdim=True)
    assert target[:, m:].sum(dim=1).min() > 0.3  # the hard negatives carry much of the global softmax
    # 0.085 here; without the correction 0.29, without hard negatives at least 0.3
    assert (0.5 * (empirical - target).abs().sum(dim=1)).max() < 0.12


def test_supervised_views_give_the_chains_hard_negatives():
    # the trainer's path: 3 views (sent0, sent1, hard_neg), each chain's state re-encoded by id
    from simcse_flat.views import contrastive_loss_on_views

    m, batch = 6, 3
    anchors, positives, hard = _supervised_table(m)
    for kernel in ("paper", "official_scan"):
        loss_fn = EMC2Loss(dataset_size=m, temperature=TAU, kernel=kernel)
        held = torch.zeros(2 * m)
        order = torch.Generator().manual_seed(2)
        for _ in range(20):
            for ids in torch.randperm(m, generator=order).split(batch):
                embeddings = torch.cat([anchors[ids], positives[ids], hard[ids]])
                contrastive_loss_on_views(loss_fn, embeddings, ids, encode_samples=views_encoder(positives, hard))
                held[loss_fn.sampler.negative_ids[ids]] += 1
        assert held[m:].sum() > 0.3 * held.sum()  # hard negatives are held about as the softmax weighs them


def test_config_names_the_kernel_and_refuses_proposals_without_the_paper_kernel():
    from simcse_flat.config import ConfigError, parse_config
    from simcse_flat.losses import build_loss_from_settings

    config = parse_config(["--loss", "emc2", "--emc2_kernel", "paper", "--emc2_proposals", "3", "--seed", "5"])
    loss_fn = build_loss_from_settings(config.loss, dataset_size=8, seed=config.training.seed)
    assert (loss_fn.kernel, loss_fn.proposals, loss_fn.sampler.seed) == ("paper", 3, 5)
    loss_fn = build_loss_from_settings(parse_config(["--loss", "emc2"]).loss, dataset_size=8, seed=0)
    assert (loss_fn.kernel, loss_fn.refresh_negatives) == ("official_scan", True)
    assert set(loss_fn.inputs_for_step(lambda states: states)) == {"chain_negatives"}  # the loop's extra pass
    cheap = parse_config(["--loss", "emc2", "--emc2_refresh_negatives", "false"]).loss
    loss_fn = build_loss_from_settings(cheap, dataset_size=8, seed=0)
    assert loss_fn.inputs_for_step(lambda states: states) == {}  # no extra pass: the biased, cheaper estimator
    assert loss_fn.get_config_dict()["refresh_negatives"] is False  # and its card says so
    with pytest.raises(ConfigError, match="emc2_kernel: paper"):
        parse_config(["--loss", "emc2", "--emc2_proposals", "3"])
