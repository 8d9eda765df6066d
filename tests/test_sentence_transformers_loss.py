"""simcse_flat's losses inside sentence-transformers: the same numbers as its own loss, and a real trainer run."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from simcse_flat import distributed
from simcse_flat.losses import FlatNCELoss
from simcse_flat.sentence_transformers_loss import SimcseFlatLoss

try:  # sentence-transformers >= 6 moved the modules
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
except ImportError:  # pragma: no cover - depends on the installed release
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Pooling, Transformer

from conftest import WORDS

ANCHORS = ["a man is playing a guitar", "the dog runs in the park", "two children eat", "a woman is cooking"]
POSITIVES = ["a man plays the guitar", "a dog is running", "kids are eating", "a woman cooks food"]
NEGATIVES = ["the park is empty", "a cat sleeps", "nobody eats", "a man is sleeping"]


@pytest.fixture()
def tiny_st(tiny_bert) -> SentenceTransformer:
    torch.manual_seed(0)
    transformer = Transformer(str(tiny_bert), max_seq_length=32)
    pooling = Pooling(transformer.auto_model.config.hidden_size, pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def _loss_and_grads(loss: torch.nn.Module, model: SentenceTransformer, columns: list[list[str]]):
    model.zero_grad()
    value = loss([model.tokenize(column) for column in columns], torch.zeros(len(columns[0])))
    value.backward()
    return value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("columns", [[ANCHORS, POSITIVES], [ANCHORS, POSITIVES, NEGATIVES]], ids=["pairs", "triplets"])
def test_infonce_is_multiple_negatives_ranking_loss_at_scale_one_over_tau(tiny_st, columns):
    tiny_st.eval()  # no dropout: both losses see the same embeddings
    ours, our_grads = _loss_and_grads(SimcseFlatLoss(tiny_st, "infonce", temperature=0.05), tiny_st, columns)
    theirs, their_grads = _loss_and_grads(MultipleNegativesRankingLoss(tiny_st, scale=20.0), tiny_st, columns)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(our_grads) == len(their_grads) > 0
    for mine, other in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, other, atol=1e-5, rtol=1e-4)


def test_flatnce_scores_each_anchor_against_every_positive_and_negative_by_hand():
    torch.manual_seed(1)
    anchors, positives, negatives = torch.randn(3, 4, 8).unbind(0)
    loss = SimcseFlatLoss(torch.nn.Identity(), "flatnce", temperature=0.1)
    value = loss.compute_loss_from_embeddings([anchors, positives, negatives])
    cos = torch.nn.functional.cosine_similarity(anchors[:, None], torch.cat([positives, negatives])[None], dim=-1)
    logits = cos / 0.1  # (4, 8): positives in columns 0-3, negatives in 4-7
    expected = torch.stack([
        torch.logsumexp(torch.cat([logits[i, :i], logits[i, i + 1 :]]), 0) - logits[i, i] for i in range(4)
    ]).mean()  # fmt: skip
    torch.testing.assert_close(value, expected)
    assert loss.get_config_dict() == FlatNCELoss(temperature=0.1).get_config_dict()
    assert "2107.01152" in loss.citation


def test_a_loss_built_by_name_takes_its_process_from_the_group_when_called(monkeypatch):
    # ST's trainer tells a loss nothing: the rank and world size are asked when it is called, not when it is built
    built = SimcseFlatLoss(torch.nn.Identity(), "flatnce")
    told = SimcseFlatLoss(torch.nn.Identity(), "flatnce", rank=0, world_size=1)
    monkeypatch.setattr(distributed, "rank", lambda: 1)  # as if process 1 of 2 when the trainer calls the loss
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    columns = list(torch.randn(2, 4, 8).unbind(0))
    with pytest.raises(ValueError, match="world_size=2"):  # took the group's size (there is no real group of 2)
        built.compute_loss_from_embeddings(columns)
    assert (built.loss_fn.rank, built.loss_fn.world_size) == (1, 2)
    told.compute_loss_from_embeddings(columns)  # the settings it was given are kept
    assert (told.loss_fn.rank, told.loss_fn.world_size) == (0, 1)


def test_losses_with_per_example_state_and_other_column_counts_are_refused(tiny_st):
    for name in ("emc2", "sogclr"):
        with pytest.raises(ValueError, match="per-example state indexed by data-set position"):
            SimcseFlatLoss(tiny_st, name)
    with pytest.raises(ValueError, match="expected 2 columns"):
        SimcseFlatLoss(tiny_st).compute_loss_from_embeddings([torch.randn(2, 4)] * 4)


def test_flatnce_trains_a_model_in_sentence_transformer_trainer(tiny_st, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    loss = SimcseFlatLoss(tiny_st, "flatnce")

    def loss_on_the_pairs() -> float:  # in eval mode (no dropout): what the trainer should lower
        tiny_st.eval()
        with torch.no_grad():
            return loss([tiny_st.tokenize(ANCHORS), tiny_st.tokenize(POSITIVES)], torch.zeros(4)).item()

    before = loss_on_the_pairs()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3,
        save_strategy="no", report_to="none", logging_steps=1, use_cpu=True, dataloader_drop_last=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # each batch: the four pairs, none its own negative
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=tiny_st,
        args=args,
        train_dataset=Dataset.from_dict({"anchor": ANCHORS * 8, "positive": POSITIVES * 8}),
        loss=loss,
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 8
    assert loss_on_the_pairs() < before - 1.0
