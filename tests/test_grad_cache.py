"""GradCache: chunked encoding without activations must give the gradient of encoding with autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import WORDS

from simcse_flat.config import ConfigError, parse_config
from simcse_flat.grad_cache import GradCache, split_rows
from simcse_flat.losses import build_loss
from simcse_flat.models.text import SentenceEncoder
from simcse_flat.trainer import train
from simcse_flat.views import contrastive_loss_on_views


def _batch(encoder: SentenceEncoder, n: int = 7) -> tuple[dict, torch.Tensor]:
    sentences = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(n)]
    tokens = encoder.tokenizer(sentences * 2, padding=True, return_tensors="pt")  # view-major: 2 views of n
    return dict(tokens), torch.arange(n)


def _step(encoder, batch, ids, loss_fn, chunk_size=None, seed=0):
    """Loss and parameter gradients of one step: plain autograd (chunk_size None), or GradCache."""
    encoder.zero_grad()
    torch.manual_seed(seed)
    if chunk_size is None:
        embeddings = encoder(**batch)
    else:
        cache = GradCache(encoder, chunk_size)
        embeddings = cache.encode(batch)
        assert embeddings.is_leaf is False and not any(p.grad is not None for p in encoder.parameters())
    loss, _ = contrastive_loss_on_views(loss_fn, embeddings, ids)
    loss.backward()
    if chunk_size is not None:
        cache.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["infonce", "flatnce"])
@pytest.mark.parametrize("chunk_size", [1, 3, 14, 100])
def test_cached_gradient_equals_the_autograd_gradient(bert_without_dropout, loss, chunk_size):
    encoder = SentenceEncoder.from_pretrained(str(bert_without_dropout), pooler="mean").train()
    batch, ids = _batch(encoder)
    loss_fn = build_loss(loss, temperature=0.05)
    loss_plain, grads_plain = _step(encoder, batch, ids, loss_fn)
    loss_cached, grads_cached = _step(encoder, batch, ids, loss_fn, chunk_size)
    torch.testing.assert_close(loss_cached, loss_plain)
    assert grads_cached.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_cached[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_replayed_dropout_gives_the_gradient_of_chunk_by_chunk_autograd(tiny_bert):
    # SimCSE's only noise is dropout: the second pass must draw the first pass's masks, chunk by chunk
    encoder = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean").train()
    batch, ids = _batch(encoder)
    loss_fn = build_loss("infonce", temperature=0.05)
    encoder.zero_grad()
    torch.manual_seed(5)
    embeddings = torch.cat([encoder(**chunk) for chunk in split_rows(batch, 4)])  # the reference: masks drawn per chunk
    loss_ref, _ = contrastive_loss_on_views(loss_fn, embeddings, ids)
    loss_ref.backward()
    expected = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    rng_after_reference = torch.get_rng_state()

    loss_cached, grads = _step(encoder, batch, ids, loss_fn, chunk_size=4, seed=5)
    torch.testing.assert_close(loss_cached, loss_ref.detach())
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)  # the replay leaves the RNG stream alone
    _, other_masks = _step(encoder, batch, ids, loss_fn, chunk_size=4, seed=6)
    first_layer = next(name for name in expected if name.endswith("encoder.layer.0.output.dense.weight"))
    assert not torch.allclose(other_masks[first_layer], expected[first_layer])


def test_training_with_grad_cache_follows_the_uncached_loss_curve(bert_without_dropout, tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(" ".join(WORDS[i : i + 4]) for i in range(40)) + "\n")

    def run(name: str, *extra: str):
        config = parse_config([
            "--model_name_or_path", str(bert_without_dropout), "--train_file", str(tmp_path / "train.txt"),
            "--pooler", "mean", "--loss", "emc2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--max_steps", "4", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
            "--output_dir", str(tmp_path / name), "--seed", "3", *extra,
        ])  # fmt: skip
        return [row["loss"] for row in train(config).history if "loss" in row]

    # EMC² also re-encodes each chain's negative through the cache
    plain, cached = run("plain"), run("cached", "--grad_cache_chunk_size", "5")
    assert len(plain) == 4
    assert cached == pytest.approx(plain, abs=1e-5)


def test_split_rows_keeps_every_row_once_in_order():
    batch = {"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2)}
    chunks = split_rows(batch, 2)
    assert [c["input_ids"].size(0) for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks]), batch["input_ids"])
    with pytest.raises(ValueError, match="same number of rows"):
        split_rows({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)


def test_config_refuses_grad_cache_with_batch_norm_and_a_negative_size():
    with pytest.raises(ConfigError, match="grad_cache_chunk_size must be >= 0"):
        parse_config(["--grad_cache_chunk_size", "-1"])
    pytest.importorskip("torchvision")
    with pytest.raises(ConfigError, match="norm_layer: group"):
        parse_config(["--modality", "vision", "--grad_cache_chunk_size", "16"])
    assert parse_config(["--modality", "vision", "--grad_cache_chunk_size", "16", "--norm_layer", "group"])
