"""Duplicates are never negatives: a candidate with the anchor's content key (another copy of the same sentence or
image) is left out of every loss, across the batch, the processes' gather and EMC²'s chains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simcse_flat.losses import ContrastiveLoss, build_loss
from simcse_flat.views import contrastive_loss_on_views

from conftest import views_encoder

TAU = 0.1


def _views(batch: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return torch.cat([anchors, anchors + 0.3 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)])


@pytest.mark.parametrize("loss_name", ["infonce", "flatnce", "dcl", "sogclr"])
def test_a_planted_duplicate_gives_the_loss_and_gradient_of_the_batch_without_it(loss_name):
    # samples 0..4; sample 4 is another copy of sample 0 (one key): neither may be the other's negative
    ids, keys = torch.arange(5), torch.tensor([10, 11, 12, 13, 10])
    embeddings = _views(5)
    embeddings[[4, 9]] = embeddings[[0, 5]] + 0.01 * _views(1, seed=1)  # the copy embeds as the original, but for dropout
    embeddings.requires_grad_()
    kwargs = {"dataset_size": 5} if loss_name == "sogclr" else {}
    masked, _ = contrastive_loss_on_views(build_loss(loss_name, temperature=TAU, **kwargs), embeddings, ids,
                                          sample_keys=keys)  # fmt: skip
    (masked_grad,) = torch.autograd.grad(masked, embeddings)

    # the reference: each anchor against the candidates that are not its duplicate, one row at a time
    reference_fn = build_loss(loss_name, temperature=TAU, **kwargs)
    anchors, positives = embeddings[:5], embeddings[5:]
    rows = []
    for i in range(5):
        keep = [j for j in range(5) if not (keys[j] == keys[i] and j != i)]
        loss, _ = reference_fn(anchors[i : i + 1], positives[keep], torch.tensor([keep.index(i)]),
                               anchor_ids=ids[i : i + 1], candidate_ids=ids[keep])  # fmt: skip
        rows.append(loss)
    reference = torch.stack(rows).mean()
    (reference_grad,) = torch.autograd.grad(reference, embeddings)
    # the losses compute their logits in fp32 whatever comes in: fp32 tolerances
    assert masked.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(masked_grad, reference_grad, rtol=1e-5, atol=1e-7)
    unmasked, _ = contrastive_loss_on_views(build_loss(loss_name, temperature=TAU, **kwargs), embeddings, ids)
    assert abs(unmasked.item() - masked.item()) > 1e-3  # the duplicate did count as a negative before


class _Recording(ContrastiveLoss):
    """A loss that records the duplicate mask it is handed (one process: the base class's rank 0 of 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def forward(self, anchors, candidates, positive, duplicate_mask=None, **kwargs):
        self.masks.append(duplicate_mask)
        return anchors.sum() * 0, {}


def test_the_mask_covers_other_samples_with_the_key_in_every_view_but_never_a_hard_negative():
    ids, keys = torch.tensor([7, 8, 9]), torch.tensor([1, 2, 1])  # samples 7 and 9: copies of one sentence
    duplicate = torch.tensor([[False, False, True], [False, False, False], [True, False, False]])
    no = torch.zeros(3, 3, dtype=torch.bool)
    for negatives, views, expected in [
        ("cross_view", 2, [duplicate]),
        ("all_views", 2, [torch.cat([duplicate, duplicate], 1)] * 2),  # both views of the copy
        ("cross_view", 3, [torch.cat([duplicate, no], 1)]),  # the hard negatives (another sentence) stay
    ]:
        loss = _Recording()
        contrastive_loss_on_views(loss, torch.randn(views * 3, 4), ids, negatives=negatives, sample_keys=keys)
        assert [m.tolist() for m in loss.masks] == [e.tolist() for e in expected], (negatives, views)
    loss = _Recording()
    contrastive_loss_on_views(loss, torch.randn(6, 4), ids)
    assert loss.masks == [None]  # no keys: nothing masked


@pytest.mark.parametrize("kernel", ["paper", "official_scan"])
def test_an_emc2_chain_never_holds_a_duplicate_of_its_anchor(kernel):
    # 12 samples; sample 6 is an exact copy of sample 0: at τ 0.05 it would dominate sample 0's softmax
    generator = torch.Generator().manual_seed(0)
    m = 12
    anchors = F.normalize(torch.randn(m, 8, generator=generator), dim=-1)
    anchors[6] = anchors[0]
    positives = anchors + 0.05 * torch.randn(m, 8, generator=generator)
    positives[6] = positives[0]
    keys = torch.arange(m)
    keys[6] = keys[0]

    def held(mask: bool) -> set[tuple[int, int]]:
        loss = build_loss("emc2", temperature=0.05, dataset_size=m, seed=1, kernel=kernel)
        encode = views_encoder(positives)  # the requested samples' positive views, as the trainer's
        pairs = set()
        for step in range(150):
            ids = torch.randperm(m, generator=torch.Generator().manual_seed(step))[:4]
            contrastive_loss_on_views(loss, torch.cat([anchors[ids], positives[ids]]), ids, encode_samples=encode,
                                      sample_keys=keys[ids] if mask else None)  # fmt: skip
            chains = loss.sampler.negative_ids
            pairs |= {(a, int(chains[a])) for a in (0, 6)}
        return pairs

    assert not held(mask=True) & {(0, 6), (6, 0)}
    assert held(mask=False) & {(0, 6), (6, 0)}  # without the mask the chains do find the copy


@pytest.mark.parametrize("loss_name", ["infonce", "flatnce", "dcl", "sogclr"])
def test_a_row_with_no_negative_left_is_left_out_of_the_step_and_counted(loss_name):
    # row 0's other candidates are both its duplicates: it has nothing to contrast with
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, True], [False, False, False], [False, False, False]])
    kwargs = {"dataset_size": 3} if loss_name == "sogclr" else {}
    loss_fn = build_loss(loss_name, temperature=TAU, **kwargs)
    loss, metrics = loss_fn(anchors, candidates, torch.arange(3), anchor_ids=torch.arange(3), duplicate_mask=mask)

    # by hand, over rows 1 and 2 only: s_ij = cos / τ
    s = F.normalize(anchors.detach(), dim=-1) @ F.normalize(candidates.detach(), dim=-1).T / TAU
    rows = []
    for i in (1, 2):
        others = torch.stack([s[i, j] for j in range(3) if j != i])
        flat = torch.logsumexp(others, 0) - s[i, i]
        rows.append({"infonce": torch.logsumexp(s[i], 0) - s[i, i], "flatnce": flat, "dcl": flat,
                     "sogclr": flat - torch.log(torch.tensor(2.0, dtype=torch.float64))}[loss_name])  # fmt: skip
    assert loss.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    assert metrics["rows_without_negatives"].item() == pytest.approx(1 / 3)
    assert metrics["infonce"].item() == pytest.approx(
        torch.stack([torch.logsumexp(s[i], 0) - s[i, i] for i in (1, 2)]).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(anchors.grad).all() and torch.isfinite(candidates.grad).all()
    assert anchors.grad[0].abs().max() == 0  # the row left out pulls and pushes nothing
    if loss_name == "sogclr":
        assert torch.isneginf(loss_fn.log_u[0]) and torch.isfinite(loss_fn.log_u[1:]).all()  # no estimate stored


def test_a_batch_of_copies_trains_on_instead_of_diverging(tiny_bert, tmp_path):
    from simcse_flat.run_folder import read_log
    from simcse_flat.trainer import train

    from test_trainer import _config

    corpus = tmp_path / "copies.txt"  # two sentences, eight copies each: a batch of 2 is often one sentence twice
    corpus.write_text("a man is playing a guitar\n" * 8 + "two dogs run in the park\n" * 8)
    for loss_name in ("flatnce", "sogclr"):
        config = _config(tiny_bert, tmp_path / loss_name, "--train_file", str(corpus), "--loss", loss_name,
                         "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "0")  # fmt: skip
        result = train(config)
        rows = [row for row in read_log(result.output_dir) if "loss" in row]
        assert result.state.step == 6 and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
        assert any(row["rows_without_negatives"] > 0 for row in rows), loss_name
