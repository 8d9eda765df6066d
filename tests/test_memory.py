"""Gradient checkpointing: the gradient of the uncheckpointed model, with dropout on, alone and inside GradCache."""

from __future__ import annotations

import pytest
import torch
from conftest import WORDS

from simcse_flat.config import ConfigError, parse_config
from simcse_flat.grad_cache import GradCache, split_rows
from simcse_flat.losses import build_loss
from simcse_flat.models.memory import enable_gradient_checkpointing
from simcse_flat.models.text import ModelLoadError, SentenceEncoder
from simcse_flat.trainer import train
from simcse_flat.views import contrastive_loss_on_views


def _batch(encoder: SentenceEncoder, n: int = 6) -> tuple[dict, torch.Tensor]:
    sentences = [" ".join(WORDS[i : i + 2 + i % 5]) for i in range(n)]  # unequal lengths: padding in every batch
    return dict(encoder.tokenizer(sentences * 2, padding=True, return_tensors="pt")), torch.arange(n)


def _layer_calls(encoder: SentenceEncoder) -> list[int]:
    """Counts the calls of the first linear map inside the first transformer layer (transformers checkpoints the
    layer's ``forward``, so the layer's own hooks run once; a recomputation calls its sub-modules again)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]
    layer = next(m for m in encoder.transformers_model.modules() if isinstance(m, GradientCheckpointingLayer))
    linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _gradients(encoder, batch, ids, chunk_size=None, seed=3):
    """Parameter gradients of one InfoNCE step: chunk by chunk with autograd (``chunk_size`` None: one chunk), or
    through GradCache (``chunk_size`` as ``("cache", n)``)."""
    loss_fn = build_loss("infonce", temperature=0.05)
    encoder.zero_grad()
    torch.manual_seed(seed)
    if isinstance(chunk_size, tuple):
        cache = GradCache(encoder, chunk_size[1])
        loss, _ = contrastive_loss_on_views(loss_fn, cache.encode(batch), ids)
        loss.backward()
        cache.backward()
    else:
        chunks = split_rows(batch, chunk_size or len(ids) * 2)
        loss, _ = contrastive_loss_on_views(loss_fn, torch.cat([encoder(**chunk) for chunk in chunks]), ids)
        loss.backward()
    return {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


def _assert_same(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5, f"max |difference| {worst:.2e}"
    return worst


@pytest.fixture(params=["bert", "qwen2"])
def encoder_with_dropout(request, tiny_bert, tiny_qwen2):
    """A tiny BERT (hidden and attention dropout 0.1) and a tiny Qwen2 decoder (attention dropout 0.1)."""
    if request.param == "bert":
        return SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean").train()
    return SentenceEncoder.from_pretrained(str(tiny_qwen2)).train()


def test_checkpointed_gradient_equals_the_plain_one_with_dropout_on(encoder_with_dropout):
    encoder = encoder_with_dropout
    batch, ids = _batch(encoder)
    expected = _gradients(encoder, batch, ids)
    first = next(iter(expected))
    assert not torch.equal(_gradients(encoder, batch, ids, seed=4)[first], expected[first])  # dropout is on
    enable_gradient_checkpointing(encoder, "tiny")
    calls = _layer_calls(encoder)
    got = _gradients(encoder, batch, ids)
    assert calls[0] == 2  # the layer ran in the forward pass and again in the backward pass: it was checkpointed
    _assert_same(got, expected)


def test_checkpointing_inside_grad_cache_gives_the_chunk_by_chunk_gradient(encoder_with_dropout):
    # GradCache replays each chunk's RNG state; checkpointing replays each layer's inside that replay
    encoder = encoder_with_dropout
    batch, ids = _batch(encoder)
    expected = _gradients(encoder, batch, ids, chunk_size=5)
    enable_gradient_checkpointing(encoder, "tiny")
    calls = _layer_calls(encoder)
    _assert_same(_gradients(encoder, batch, ids, chunk_size=("cache", 5)), expected)
    assert calls[0] == 3 * 3  # 3 chunks: the cached pass, the replayed pass, its recomputation


@pytest.mark.parametrize("loss", ["infonce", "emc2"])  # EMC² also encodes each chain's negative in a pass of its own
def test_a_run_with_checkpointing_follows_the_plain_loss_curve_and_weights(tiny_bert, tmp_path, loss):
    (tmp_path / "train.txt").write_text("\n".join(" ".join(WORDS[i : i + 4]) for i in range(24)) + "\n")

    def run(name: str, *extra: str):
        config = parse_config([
            "--model_name_or_path", str(tiny_bert), "--train_file", str(tmp_path / "train.txt"), "--pooler", "mean",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps",
            "1", "--save_steps", "0", "--report_to", "none", "--output_dir", str(tmp_path / name), "--seed", "3",
            "--loss", loss, *extra,
        ])  # fmt: skip
        result = train(config)
        return [row["loss"] for row in result.history], SentenceEncoder.from_pretrained(str(result.final_model))

    (plain, plain_model), (checkpointed, model) = run("plain"), run("ckpt", "--gradient_checkpointing", "true")
    assert checkpointed == pytest.approx(plain, abs=1e-5)  # dropout on: the same masks in both runs
    pairs = zip(model.state_dict().values(), plain_model.state_dict().values())
    worst = max((a - b).abs().max().item() for a, b in pairs)
    assert worst <= 1e-5


def test_checkpointing_where_it_cannot_work_fails_before_training_in_one_line(tiny_bert, monkeypatch):
    encoder = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean")
    monkeypatch.setattr(type(encoder.transformers_model), "supports_gradient_checkpointing", False)
    with pytest.raises(ModelLoadError, match="does not support gradient checkpointing") as err:
        enable_gradient_checkpointing(encoder, "tiny")
    assert "\n" not in str(err.value)
    pytest.importorskip("torchvision")
    with pytest.raises(ConfigError, match="gradient_checkpointing applies to text models"):
        parse_config(["--modality", "vision", "--gradient_checkpointing", "true"])


def test_the_memory_benchmark_fits_its_line_and_trains_only_the_adapters_with_lora():
    from conftest import load_script

    bench = load_script("bench_decoder_memory")
    assert bench._fit([(8, 100.0), (32, 340.0), (128, 1300.0)]) == pytest.approx((20.0, 10.0))
    args = bench.parse_args(["--layers", "1", "--hidden", "64", "--tokens", "4"])
    plain, lora = bench.measure(args, "plain", 2), bench.measure(args, "lora", 2)
    assert plain["trainable"] == plain["parameters"] == lora["parameters"] - lora["trainable"]  # the base, frozen
    assert lora["trainable"] == 4 * 2 * 8 * 64  # r 8 on q, k, v, o of one layer: A (8 x 64) and B (64 x 8) each
    assert plain["memory"] == lora["memory"] and plain["added_mib"] > 0
