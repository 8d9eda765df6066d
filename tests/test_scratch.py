"""Training from scratch (run_mlm.py's convention: model_type, config_overrides, tokenizer_name; weights from the run's
seed) and the batch-size sweep of scripts/compare_losses.py: data budget, learning-rate rule, tuning, CSV, plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, load_script

from simcse_flat.config import ConfigError, parse_config
from simcse_flat.modalities.text import DEFAULT_MODEL
from simcse_flat.models.text import SentenceEncoder

SENTEVAL_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "senteval"
SHAPE = "num_hidden_layers=1,hidden_size=16,num_attention_heads=2,intermediate_size=32,max_position_embeddings=64"


def _fresh(tokenizer: Path, seed: int, overrides: str = SHAPE) -> SentenceEncoder:
    torch.manual_seed(seed)
    return SentenceEncoder.from_scratch("bert", str(tokenizer), overrides, pooler="mean")


def test_from_scratch_builds_the_overridden_shape_with_the_tokenizers_vocabulary(tiny_bert):
    encoder = _fresh(tiny_bert, seed=1)
    config = encoder.transformers_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (1, 16, 32)
    assert config.vocab_size == len(encoder.tokenizer) != 30522  # BertConfig's default follows the tokenizer
    assert encoder.pooler == "mean" and encoder.encode(["a man is playing"]).shape == (1, 16)


def test_from_scratch_weights_come_from_the_seed(tiny_bert):
    first, again, other = _fresh(tiny_bert, 1), _fresh(tiny_bert, 1), _fresh(tiny_bert, 2)
    pairs = list(zip(first.state_dict().values(), again.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    weights = "0.model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(first.state_dict()[weights], other.state_dict()[weights])


def test_a_bad_override_is_named(tiny_bert):
    from simcse_flat.models.text import ModelLoadError

    with pytest.raises(ModelLoadError, match="config_overrides 'num_hidden_layerz=1'"):
        _fresh(tiny_bert, 1, "num_hidden_layerz=1")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model_type", "bert", "--model_name_or_path", "x", "--tokenizer_name", "t"], "set one of them"),
        (["--model_type", "bert"], "needs tokenizer_name"),
        (["--model_type", "bertt", "--tokenizer_name", "t"], "Did you mean 'bert'"),
        (["--config_overrides", "hidden_size=16"], "set model_type"),
        (["--tokenizer_name", "t"], "set model_type"),
    ],
)
def test_scratch_settings_are_checked_before_anything_loads(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(flags)


def test_no_model_given_means_the_packaged_minilm():
    assert parse_config([]).settings.model_name_or_path == DEFAULT_MODEL


@pytest.mark.slow
def test_a_run_from_scratch_starts_at_the_untrained_encoder_and_exports_a_sentence_transformer(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    from simcse_flat.evaluation import evaluate_sts
    from simcse_flat.export import load_trained_encoder
    from simcse_flat.trainer import train

    sentences = tmp_path / "train.txt"
    sentences.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(0, 80, 2)) + "\n")
    argv = ["--model_type", "bert", "--config_overrides", SHAPE, "--tokenizer_name", str(tiny_bert),
            "--pooler", "mean", "--train_file", str(sentences), "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "6",
            "--eval_tasks", "stsb", "--eval_split", "dev", "--eval_data_dir", str(SENTEVAL_SAMPLE),
            "--report_to", "none", "--output_dir", str(tmp_path / "run"), "--seed", "7"]  # fmt: skip
    result = train(parse_config(argv))

    untrained = _fresh(tiny_bert, seed=7)  # the run's seed gives the run's initial weights
    step0 = next(row for row in result.history if row["step"] == 0 and "eval/stsb_spearman" in row)
    expected = evaluate_sts(untrained.encode, ["stsb"], SENTEVAL_SAMPLE, split="dev")["stsb_spearman"]
    assert step0["eval/stsb_spearman"] == pytest.approx(expected, abs=1e-6)

    card = (result.final_model / "README.md").read_text()
    assert "| initialisation | from scratch: `bert` (num_hidden_layers=1," in card and "seed 7" in card
    trained = SentenceTransformer(str(result.final_model), device="cpu")  # no simcse_flat needed to load it
    moved = np.abs(trained.encode(["a man is playing"]) - untrained.encode(["a man is playing"])).max()
    assert moved > 1e-3  # it trained
    # a checkpoint rebuilds the same fresh architecture, then takes the trained weights
    from_checkpoint, _ = load_trained_encoder(tmp_path / "run" / "checkpoint-6")
    np.testing.assert_allclose(from_checkpoint.encode(["the dog"]), trained.encode(["the dog"]), atol=1e-5)


# --- scripts/compare_losses.py: the sweep ---


def test_learning_rate_rules():
    """The trainer's one rule (optim.py), and its inverse, with which the sweep gives a rate at a base batch."""
    from simcse_flat.optim import configured_learning_rate, scaled_learning_rate

    assert scaled_learning_rate(1e-3, 128, "none") == 1e-3
    assert scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)  # SimCLR: 0.3 at 256
    assert scaled_learning_rate(0.075, 256, "sqrt") == pytest.approx(1.2)  # FlatCLR: 0.075 x sqrt(256)
    for rule, at_128 in (("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)):  # 1e-3 at batch 32
        configured = configured_learning_rate(1e-3, 32, rule)
        assert scaled_learning_rate(configured, 32, rule) == pytest.approx(1e-3)
        assert scaled_learning_rate(configured, 128, rule) == pytest.approx(at_128)


def test_a_data_budget_gives_every_batch_size_the_same_examples(tmp_path):
    from simcse_flat.optim import scaled_learning_rate

    script = load_script("compare_losses")
    sweep = script.Sweep("c.yaml", tmp_path, [], {}, None, examples=1000, lr_scaling="sqrt", base_batch_size=16)
    flags = sweep.settings(64, 1e-3, 0.1)
    values = dict(zip(flags[::2], flags[1::2]))
    assert values["--max_steps"] == "16"  # ceil(1000 / 64): every run sees at least the budget
    assert values["--eval_steps"] == "4" and values["--save_steps"] == "8"
    assert values["--temperature"] == "0.1" and values["--lr_scaling"] == "sqrt"

    def trained_at(flags: list[str], batch: int) -> float:  # what the trainer's rule makes of the flags
        values = dict(zip(flags[::2], flags[1::2]))
        return scaled_learning_rate(float(values["--learning_rate"]), batch, values["--lr_scaling"])

    assert trained_at(flags, 64) == pytest.approx(2e-3)  # 1e-3 at batch 16, x sqrt(64 / 16)
    untuned = dict(zip(*[iter(sweep.settings(8, None, None))] * 2))
    assert untuned["--max_steps"] == str(math.ceil(1000 / 8)) and "--learning_rate" not in untuned  # no base lr
    sweep.base_learning_rate = 4e-4  # the config's: scaled by the rule when no tuning gave one
    assert trained_at(sweep.settings(64, None, None), 64) == pytest.approx(8e-4)
    sweep.lr_scaling = "none"  # and left to the config when its rule is the sweep's
    assert "--learning_rate" not in sweep.settings(64, None, None)


def test_tuning_keeps_the_pair_with_the_best_final_dev_score(tmp_path, monkeypatch):
    script = load_script("compare_losses")
    scores = {(3e-4, 0.05): 50.0, (3e-4, 0.1): 61.0, (1e-3, 0.05): 58.0, (1e-3, 0.1): None}
    calls = []

    def fake_run(sweep, loss, batch, seed, folder, lr, tau):
        calls.append((folder.name, batch, seed))
        return {"run": f"{loss}_b{batch}_seed{seed}", "loss": loss, "learning_rate": lr, "temperature": tau,
                "final": scores[(lr, tau)]}  # fmt: skip

    monkeypatch.setattr(script, "run_one", fake_run)
    sweep = script.Sweep("c.yaml", tmp_path, [], {}, None)
    lr, tau, rows = script.tune(sweep, "flatnce", 32, 1, [3e-4, 1e-3], [0.05, 0.1])
    assert (lr, tau) == (3e-4, 0.1)
    assert {c[0] for c in calls} == {"lr0.0003_tau0.05", "lr0.0003_tau0.1", "lr0.001_tau0.05", "lr0.001_tau0.1"}
    assert all(r["tuning"] and r["run"].startswith("tune/") for r in rows)


def test_curves_give_mean_and_sample_sd_over_seeds_per_batch():
    script = load_script("compare_losses")
    rows = [
        {"loss": "infonce", "batch_size": 8, "final": 50.0},
        {"loss": "infonce", "batch_size": 8, "final": 54.0},
        {"loss": "infonce", "batch_size": 64, "final": 60.0},
        {"loss": "flatnce", "batch_size": 8, "final": 61.0},
        {"loss": "flatnce", "batch_size": 8, "final": None},  # a run without the metric is left out
    ]
    curves = script.curves(rows, "final")
    assert curves["infonce"] == [(8, 52.0, pytest.approx(2 * math.sqrt(2)), 2), (64, 60.0, 0.0, 1)]
    assert curves["flatnce"] == [(8, 61.0, 0.0, 1)]


def test_results_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    script = load_script("compare_losses")
    rows = [
        {"run": f"{loss}_b{b}_seed{s}", "loss": loss, "batch_size": b, "seed": s, "learning_rate": 1e-3,
         "temperature": 0.05, "steps": 64 // b, "examples": 64, "before": 40.0 + s, "best": 50.0 + b / 8,
         "final": 49.0 + b / 8 + s, "test": 45.0, "wall_seconds": 12.345, "peak_memory_mb": 900.0}
        for loss in ("infonce", "flatnce") for b in (8, 16) for s in (1, 2)
    ]  # fmt: skip
    script.write_results(rows, tmp_path / "results.csv", untrained=None)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and tuple(table[0]) == script.CSV_COLUMNS
    first = table[0]
    assert (first["loss"], first["batch_size"], first["untrained"], first["dev_final"]) == ("infonce", "8", "41.0", "51.0")
    assert (first["dev_best"], first["test_mean"], first["seconds"], first["linear"]) == ("51.0", "45.0", "12.3", "")

    script.plot_against_batch(rows, "final", tmp_path / "plot.png", None, title="t")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
