"""The exported folder: sentence-transformers loads it and gives the trainer's embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from simcse_flat.export import embeddings_match, model_card, push_to_hub
from simcse_flat.models.text import SentenceEncoder

SENTENCES = ["a man is playing a guitar", "the dog runs in the park", "two children are eating", "x"]


@pytest.mark.parametrize(
    ("pooler", "mlp_only_train", "has_dense"),
    [("mean", False, False), ("cls", False, True), ("cls", True, False), ("cls_before_pooler", False, False),
     ("avg_first_last", False, False)],
)
def test_sentence_transformers_gives_the_trainers_embeddings(tiny_bert, tmp_path, pooler, mlp_only_train, has_dense):
    encoder = SentenceEncoder.from_pretrained(str(tiny_bert), pooler=pooler, mlp_only_train=mlp_only_train)
    if encoder.mlp is not None:
        torch.nn.init.normal_(encoder.mlp.dense.weight)  # a trained-looking head, far from identity
    encoder.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "2_Dense").exists() == has_dense
    assert embeddings_match(encoder, tmp_path / "model", SENTENCES) < 1e-5
    # and our own loader reads the folder back to the same encoder
    reloaded = SentenceEncoder.from_pretrained(str(tmp_path / "model"))
    assert reloaded.pooler == ("cls_before_pooler" if mlp_only_train else pooler)  # the same at inference
    torch.testing.assert_close(reloaded.encode(SENTENCES), encoder.encode(SENTENCES), atol=1e-5, rtol=0)


def test_avg_first_last_is_the_first_and_last_layers_not_the_embeddings(tiny_bert, tmp_path):
    # the exported pipeline must differ from mean pooling and from averaging the embedding layer with the last
    encoder = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="avg_first_last")
    encoder.save_pretrained(tmp_path / "model")
    mean = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean")
    assert embeddings_match(mean, tmp_path / "model", SENTENCES) > 1e-3
    layer_pooling = json.loads((tmp_path / "model" / "modules.json").read_text())[1]
    config = tmp_path / "model" / layer_pooling["path"] / "config.json"
    config.write_text(config.read_text().replace('"layer_start": 1', '"layer_start": 0'))
    with pytest.raises(ValueError, match="only the first-and-last-layer average"):
        SentenceEncoder.from_pretrained(str(tmp_path / "model"))


def test_packaged_minilm_round_trips_with_its_normalisation(minilm_path, tmp_path):
    encoder = SentenceEncoder.from_pretrained(minilm_path, max_seq_length=64)
    assert (encoder.pooler, encoder.normalize) == ("mean", True)
    encoder.save_pretrained(tmp_path / "minilm")
    assert embeddings_match(encoder, tmp_path / "minilm", SENTENCES) < 1e-5
    # the source folder itself agrees with our encoder too: we read its pooling right
    assert embeddings_match(encoder, minilm_path, SENTENCES) < 1e-5


def test_model_card_has_the_hub_header_and_the_facts():
    card = model_card(
        base_model="bert-base-uncased",
        loss_config={"loss": "flatnce", "temperature": 0.05},
        config={"output_dir": "runs/x", "per_device_train_batch_size": 16, "train_file": "wiki.txt"},
        sts_table="stsb  80.00",
        command="accelerate launch train.py --config configs/x.yaml",
        steps=100,
        data_license="CC BY-SA",
    )
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "base_model: bert-base-uncased" in card
    for fact in ("flatnce", "| batch size per device | 16 |", "stsb  80.00", "configs/x.yaml", "CC BY-SA", "| 100 |"):
        assert fact in card


def test_push_to_hub_uploads_the_folder(monkeypatch, tmp_path):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = push_to_hub(tmp_path, "user/model", private=True, token="t")
    assert url == "https://hub/user/model/commit/1"
    assert calls == [("init", "t"), ("create", "user/model", True, True), ("upload", str(tmp_path), "user/model")]


def test_export_script_reads_a_checkpoint_and_a_final_folder(tiny_bert, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    from simcse_flat.config import parse_config
    from simcse_flat.trainer import train

    (tmp_path / "s.txt").write_text("\n".join(f"the man {w} a dog" for w in "abcdefghijklmnop") + "\n")
    result = train(parse_config([
        "--model_name_or_path", str(tiny_bert), "--train_file", str(tmp_path / "s.txt"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--output_dir", str(tmp_path / "run"),
        "--loss", "flatnce", "--pooler", "cls",
    ]))  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_model.py"
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000002"
    for source, out in ((checkpoint, tmp_path / "from_checkpoint"), (result.final_model, tmp_path / "from_final")):
        done = subprocess.run([sys.executable, str(script), str(source), str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        card = (out / "README.md").read_text()
        assert "flatnce" in card and "accelerate launch train.py --config training_config.yaml" in card
        assert (out / "training_config.yaml").exists()
        # the checkpoint's weights and the final folder's weights are the same model: same vectors
        vectors = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
        reference = SentenceTransformer(str(result.final_model), device="cpu").encode(SENTENCES)
        assert abs(vectors - reference).max() < 1e-5
