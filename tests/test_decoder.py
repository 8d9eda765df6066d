"""Decoder embedders: a causal-LM backbone pooled at its last real token (left or right padding), EOS appended,
instruction prompts in training as in ``encode``; from a config, a folder, a hub id, or a sentence-transformers
model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, put_in_hub_cache, write_tiny_decoder

from simcse_flat.config import parse_config
from simcse_flat.data.text import ContrastiveCollator
from simcse_flat.models.text import Pooling, SentenceEncoder, Transformer, append_eos

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["a man is playing a guitar in the park", "the dog", "two children are eating", "x"]  # unequal lengths


def _pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of ``(L_i, D)`` padded (with 99) on ``side`` into ``(n, L, D)``, and their attention mask."""
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest, rows[0].size(1)), 99.0)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(0, len(row)) if side == "right" else slice(longest - len(row), longest)
        out[i, place], mask[i, place] = row, 1
    return out, mask


def test_lasttoken_pooling_picks_the_last_real_token_under_left_and_right_padding():
    lengths = [5, 2, 3, 1]
    rows = [torch.arange(n * 4, dtype=torch.float).view(n, 4) + 100 * i for i, n in enumerate(lengths)]
    pooling = Pooling(4, pooling_mode="lasttoken")
    for side in ("right", "left"):
        tokens, mask = _pad(rows, side)
        pooled = pooling({"token_embeddings": tokens, "attention_mask": mask})["sentence_embedding"]
        assert torch.equal(pooled, torch.stack([row[-1] for row in rows])), side


def _embed(encoder: SentenceEncoder, sentences: list[str], side: str) -> torch.Tensor:
    encoder.tokenizer.padding_side = side
    tokens = encoder.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(**tokens)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_a_causal_lm_folder_is_pooled_at_its_eos_the_same_under_left_and_right_padding(tmp_path, model_type):
    encoder = SentenceEncoder.from_pretrained(str(write_tiny_decoder(tmp_path / model_type, model_type))).eval()
    assert encoder.pooler == "lasttoken"
    tokenizer = encoder.tokenizer
    assert all(tokenizer(s)["input_ids"][-1] == tokenizer.eos_token_id for s in SENTENCES)  # EOS appended
    right, left = _embed(encoder, SENTENCES, "right"), _embed(encoder, SENTENCES, "left")
    alone = torch.cat([_embed(encoder, [s], "right") for s in SENTENCES])
    # RoPE sees relative positions only, so the left-padded rows' shifted positions change nothing but rounding
    assert (right - alone).abs().max() <= 1e-5 and (left - alone).abs().max() <= 1e-5
    assert (alone[0] - alone[1]).abs().max() > 1e-2  # distinct sentences, distinct embeddings


def test_a_causal_lm_hub_id_takes_the_hub_path_and_the_decoder_defaults(tiny_qwen2, tmp_path, monkeypatch):
    put_in_hub_cache(tiny_qwen2, "tiny-org/tiny-qwen2", tmp_path / "hf", monkeypatch)
    encoder = SentenceEncoder.from_pretrained("tiny-org/tiny-qwen2").eval()
    assert encoder.pooler == "lasttoken" and encoder.tokenizer("a")["input_ids"][-1] == encoder.tokenizer.eos_token_id
    expected = SentenceEncoder.from_pretrained(str(tiny_qwen2)).eval()
    np.testing.assert_allclose(encoder.encode(SENTENCES), expected.encode(SENTENCES), atol=1e-6)


def test_a_sentence_transformers_decoder_trains_on_its_prompt_and_padding_as_it_encodes(tmp_path):
    # Qwen3-Embedding's shape: left padding, EOS from the tokenizer, last-token pooling, an instruction prompt
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    folder = write_tiny_decoder(tmp_path / "qwen2", padding_side="left")
    transformer = Transformer(str(folder))
    append_eos(transformer.tokenizer, "tiny")
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken"), Normalize()]
    prompts = {"query": "Instruct: find the same sentence Query: "}
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="query").save(str(tmp_path / "st"))
    encoder = SentenceEncoder.from_pretrained(str(tmp_path / "st")).eval()
    assert encoder.pooler == "lasttoken" and encoder.tokenizer.padding_side == "left"
    collator = ContrastiveCollator(encoder.tokenizer, 64, encoder.training_prompt()[0])
    batch = collator([{"text": text, "idx": i} for i, text in enumerate(SENTENCES)])
    assert batch["attention_mask"][:, 0].min() == 0  # left-padded, as encode pads
    batch.pop("sample_ids")
    with torch.no_grad():
        trained_on = encoder(**batch)[: len(SENTENCES)]
    encoded = encoder.encode(SENTENCES, convert_to_tensor=True)
    assert (trained_on - encoded).abs().max() <= 1e-5
    unprompted = encoder.encode(SENTENCES, prompt="", convert_to_tensor=True)
    assert (encoded - unprompted).abs().max() > 1e-3  # the prompt is there in both


@pytest.mark.slow
def test_the_tiny_decoder_recipe_trains_from_scratch_and_exports_what_it_trained(tmp_path):
    from sentence_transformers import SentenceTransformer

    from simcse_flat.export import load_trained_encoder
    from simcse_flat.trainer import train

    (tmp_path / "train.txt").write_text("\n".join(" ".join(WORDS[i : i + 3 + i % 5]) for i in range(32)) + "\n")
    config = parse_config(["--config", str(ROOT / "configs" / "decoder_tiny.yaml"), "--train_file",
                           str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / "run")])  # fmt: skip
    result = train(config)
    assert len(result.history) >= 2 and all(np.isfinite(row["loss"]) for row in result.history)
    trained, _ = load_trained_encoder(sorted(result.output_dir.glob("checkpoint-*"))[-1])
    exported = SentenceTransformer(str(result.final_model), device="cpu")
    assert exported[0].auto_model.config.model_type == "qwen2" and exported[1].pooling_mode == "lasttoken"
    difference = np.abs(exported.encode(SENTENCES) - trained.eval().encode(SENTENCES)).max()
    assert difference <= 1e-5, difference
