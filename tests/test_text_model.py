"""The text model is a SentenceTransformer: a hub id, a sentence-transformers folder and a plain Hugging Face folder
load as sentence-transformers reads them, give its embeddings and its STS figures; bad input fails in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import put_in_hub_cache

from simcse_flat.models.text import ModelLoadError, SentenceEncoder

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["a man is playing a guitar", "the dog runs in the park", "two children are eating", "x"]


@pytest.fixture
def hub_cache(minilm_path, tmp_path, monkeypatch) -> dict[str, str]:
    """all-MiniLM-L6-v2 in an offline Hugging Face cache, as the hub would put it there."""
    return put_in_hub_cache(minilm_path, HUB_ID, tmp_path / "hf", monkeypatch)


def _reference_embeddings(model_id_or_path: str, sentences: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_id_or_path, device="cpu").encode(sentences)


def test_hub_id_loads_as_sentence_transformers_reads_it(hub_cache):
    encoder = SentenceEncoder.from_pretrained(HUB_ID)
    assert encoder.pooler == "mean" and encoder.max_seq_length == 256  # the model's own, not cls and 512
    np.testing.assert_allclose(encoder.encode(SENTENCES), _reference_embeddings(HUB_ID, SENTENCES), atol=1e-6)


@pytest.mark.slow
def test_evaluate_sts_on_a_hub_id_equals_sentence_transformers_evaluator(hub_cache, shared_data, tmp_path):
    """The README's own command, offline from the cache: STS-B dev as EmbeddingSimilarityEvaluator scores it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from simcse_flat.evaluation import load_sts_tasks

    output = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "evaluate_sts.py"), HUB_ID, "--tasks", "stsb", "--split", "dev",
         "--data_dir", str(shared_data / "senteval"), "--output", str(output)],
        capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, **hub_cache},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    ours = json.loads(output.read_text())["results"]["stsb_spearman"]
    (task,) = load_sts_tasks(["stsb"], shared_data / "senteval", "dev")
    evaluator = EmbeddingSimilarityEvaluator(*zip(*task.pairs), similarity_fn_names=["cosine"], name="stsb", write_csv=False)
    theirs = 100 * evaluator(SentenceTransformer(HUB_ID, device="cpu"))[evaluator.primary_metric]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert ours > 86  # 86.72; the old loader read this hub id as cls pooling: 79.46


def _simcse_reference(encoder: SentenceEncoder, pooler: str, sentences: list[str]) -> torch.Tensor:
    """SimCSE's poolers written out on the backbone's outputs (what the trainer computed before this model)."""
    backbone = encoder.transformers_model
    batch = encoder.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = backbone(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    masked_mean = lambda hidden: (hidden * mask).sum(1) / mask.sum(1)  # noqa: E731
    if pooler == "mean":
        return masked_mean(out.last_hidden_state)
    if pooler == "avg_first_last":
        return masked_mean((out.hidden_states[1] + out.hidden_states[-1]) / 2)
    cls = out.last_hidden_state[:, 0]
    if pooler == "cls":
        with torch.no_grad():
            return torch.tanh(encoder[2].linear(cls))
    return cls


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "mean", "avg_first_last"])
def test_plain_folder_with_each_pooler_gives_simcses_embeddings_and_reloads(tiny_bert, tmp_path, pooler):
    encoder = SentenceEncoder.from_pretrained(str(tiny_bert), pooler=pooler).eval()
    if pooler == "cls":
        torch.nn.init.normal_(encoder[2].linear.weight)  # a trained-looking head, far from identity
    expected = _simcse_reference(encoder, pooler, SENTENCES)
    np.testing.assert_allclose(encoder.encode(SENTENCES), expected.numpy(), atol=1e-6)
    # the training call: token tensors in, (n, D) out, the same vectors in eval mode
    batch = encoder.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    torch.testing.assert_close(encoder(**batch).detach(), expected, atol=1e-6, rtol=0)
    encoder.save(str(tmp_path / "model"))
    np.testing.assert_allclose(_reference_embeddings(str(tmp_path / "model"), SENTENCES), expected.numpy(), atol=1e-6)
    assert SentenceEncoder.from_pretrained(str(tmp_path / "model")).pooler == pooler


def test_mlp_only_at_training_trains_through_the_mlp_and_saves_without_it(tmp_path):
    from conftest import write_tiny_bert

    no_dropout = write_tiny_bert(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = SentenceEncoder.from_pretrained(str(no_dropout), pooler="cls", mlp_only_train=True)
    torch.nn.init.normal_(encoder[2].linear.weight)
    batch = encoder.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    cls_vectors = _simcse_reference(encoder.eval(), "cls_before_pooler", SENTENCES)
    torch.testing.assert_close(encoder(**batch).detach(), cls_vectors, atol=1e-6, rtol=0)  # inference: before the MLP
    encoder.train()  # training: through the MLP (no dropout in this model, so the same backbone vectors)
    torch.testing.assert_close(encoder(**batch).detach(), _simcse_reference(encoder, "cls", SENTENCES), atol=1e-6, rtol=0)
    encoder.save(str(tmp_path / "model"))
    assert "TrainingOnlyMLP" not in (tmp_path / "model" / "modules.json").read_text()
    assert len(encoder) == 3  # saving leaves the training model whole
    np.testing.assert_allclose(_reference_embeddings(str(tmp_path / "model"), SENTENCES), cls_vectors.numpy(), atol=1e-6)


@pytest.mark.parametrize("include_prompt", [True, False])
def test_training_batches_carry_the_models_default_prompt_as_encode_does(tiny_bert, tmp_path, include_prompt):
    from sentence_transformers import SentenceTransformer

    from simcse_flat.data.text import ContrastiveCollator
    from simcse_flat.models.text import Pooling, Transformer

    transformer = Transformer(str(tiny_bert))
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean", include_prompt=include_prompt)
    SentenceTransformer(modules=[transformer, pooling], prompts={"query": "the dog "},
                        default_prompt_name="query").save(str(tmp_path / "prompted"))  # fmt: skip
    encoder = SentenceEncoder.from_pretrained(str(tmp_path / "prompted")).eval()
    collator = ContrastiveCollator(encoder.tokenizer, 64, encoder.training_prompt()[0])
    batch = collator([{"text": text, "idx": i} for i, text in enumerate(SENTENCES)])
    batch.pop("sample_ids")
    with torch.no_grad():
        trained_on = encoder(**batch)[: len(SENTENCES)]  # view 0 of the loop's forward
    np.testing.assert_allclose(trained_on.numpy(), encoder.encode(SENTENCES), atol=1e-5)


def test_a_hub_id_not_in_the_cache_offline_fails_in_one_line(hub_cache):
    with pytest.raises(ModelLoadError) as error:
        SentenceEncoder.from_pretrained("nobody/no-such-model")
    message = str(error.value)
    assert "\n" not in message and "'nobody/no-such-model'" in message and "HF_HUB_OFFLINE=1" in message


def test_a_module_that_cannot_be_loaded_is_named_in_one_line(tiny_bert, tmp_path):
    folder = tmp_path / "model"
    SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean").save(str(folder))
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "my_package.pooling.FancyPooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError) as error:
        SentenceEncoder.from_pretrained(str(folder))
    assert "\n" not in str(error.value) and "FancyPooling" in str(error.value)


def test_a_pooler_other_than_the_models_own_is_refused(minilm_path):
    with pytest.raises(ModelLoadError, match="whose pooling is mean, not 'cls'"):
        SentenceEncoder.from_pretrained(minilm_path, pooler="cls")


def test_training_a_model_whose_first_module_is_not_a_transformer_fails_in_one_line(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer

    from simcse_flat.config import parse_config
    from simcse_flat.trainer import train

    static = StaticEmbedding(Tokenizer.from_file(str(tiny_bert / "tokenizer.json")), embedding_dim=8)
    SentenceTransformer(modules=[static], device="cpu").save(str(tmp_path / "static"))
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n")
    config = parse_config(["--model_name_or_path", str(tmp_path / "static"), "--train_file", str(tmp_path / "s.txt"),
                           "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "run"),
                           "--report_to", "none"])  # fmt: skip
    with pytest.raises(ModelLoadError) as error:
        train(config)
    assert "\n" not in str(error.value) and "first module is StaticEmbedding" in str(error.value)


def test_loading_from_python_shows_no_load_report_for_the_pooler_we_drop(tiny_bert, minilm_path, caplog, capsys):
    """We build BERT without its unused pooler: transformers' "pooler.dense.* | UNEXPECTED" table is our doing, and
    is not shown (the CLI silences transformers anyway; a library user must not see it either)."""
    import logging

    with caplog.at_level(logging.WARNING):
        SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean")
        SentenceEncoder.from_pretrained(minilm_path)
    assert "LOAD REPORT" not in caplog.text + capsys.readouterr().err
    from simcse_flat.models.text import _only_the_dropped_pooler_reported

    report = "BertModel LOAD REPORT from: x\nKey | Status | |\n---+---+-+-\n{} | {} | |\n"
    record = lambda key, status: logging.LogRecord("t", logging.WARNING, "", 0, report.format(key, status), None, None)
    assert not _only_the_dropped_pooler_reported(record("pooler.dense.weight", "UNEXPECTED"))
    assert _only_the_dropped_pooler_reported(record("encoder.layer.0.output.dense.weight", "MISSING"))  # still shown
    assert _only_the_dropped_pooler_reported(record("pooler.dense.weight", "MISMATCH"))
