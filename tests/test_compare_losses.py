"""scripts/compare_losses.py: its tables, and a text run's row (vision runs are tested in test_vision.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import WORDS, load_script

SENTEVAL_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "senteval"  # the quickstart's STS-B dev copy


def test_seed_summary_gives_mean_and_sample_deviation_per_loss():
    script = load_script("compare_losses")
    rows = [
        {"run": "infonce_b4_seed1", "best": 80.0, "linear": None},
        {"run": "infonce_b4_seed2", "best": 83.0, "linear": None},
        {"run": "infonce_b4_seed3", "best": 83.0, "linear": None},
        {"run": "flatnce_b4_seed1", "best": 81.5, "linear": None},
    ]
    table = script.format_seed_summary(rows).splitlines()
    assert table[0] == "| run | seeds | best |"  # no probe column: no row has one
    # mean 82, sample deviation sqrt((4 + 1 + 1) / 2) = sqrt(3)
    assert table[2] == "| infonce_b4 | 3 | 82.00 ± 1.73 |"
    assert table[3] == "| flatnce_b4 | 1 | 81.50 |"


def _tiny_config(tmp_path: Path, tiny_bert, settings: str) -> Path:
    """A yaml training the tiny BERT on 20 short sentences at batch 4, lr 1e-3, with ``settings`` added."""
    sentences = tmp_path / "train.txt"
    sentences.write_text("\n".join(" ".join(WORDS[i : i + 5]) for i in range(0, 60, 3)) + "\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model_name_or_path: {tiny_bert}\npooler: mean\ntrain_file: {sentences}\n"
                      f"per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\nsave_steps: 0\nseed: 5\n{settings}")  # fmt: skip
    return config


def test_text_rows_match_evaluate_sts_and_a_rerun_reads_finished_runs_back(tiny_bert, tmp_path, capsys):
    import shutil

    from simcse_flat.evaluation import evaluate_sts
    from simcse_flat.models.text import SentenceEncoder
    from simcse_flat.run_folder import read_log

    script = load_script("compare_losses")
    config = _tiny_config(tmp_path, tiny_bert, "max_steps: 3\neval_steps: 2\neval_tasks: [stsb]\neval_split: dev\n"
                          f"eval_data_dir: {SENTEVAL_SAMPLE}\n")  # fmt: skip
    test_dir = tmp_path / "senteval"  # the STS-B dev sample standing in for a test set
    (test_dir / "STS" / "STSBenchmark").mkdir(parents=True)
    stsb_dir = Path("STS") / "STSBenchmark"
    shutil.copy(SENTEVAL_SAMPLE / stsb_dir / "sts-dev.csv", test_dir / stsb_dir / "sts-test.csv")
    argv = ["--config", str(config), "--losses", "flatnce", "--output_dir", str(tmp_path / "c"),
            "--test_data_dir", str(test_dir), "--test_tasks", "stsb"]  # fmt: skip
    (row,) = script.main(argv)
    assert "| flatnce |" in capsys.readouterr().out
    assert row["steps"] == 3 and row["flatnce"] is not None and row["seconds"] > 0

    def stsb(model, split: str, data_dir: Path) -> float:
        return evaluate_sts(model.encode, ["stsb"], data_dir, split=split)["stsb_spearman"]

    final = SentenceEncoder.from_pretrained(str(tmp_path / "c" / "flatnce" / "final"))
    assert row["final"] == pytest.approx(stsb(final, "dev", SENTEVAL_SAMPLE), abs=1e-4)
    assert row["test"] == pytest.approx(stsb(final, "test", test_dir), abs=1e-4)
    untrained = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean")
    assert row["before"] == pytest.approx(stsb(untrained, "dev", SENTEVAL_SAMPLE), abs=1e-4)
    # evaluated at steps 2 and 3 (the last): best is the larger, never the untrained starting point
    assert row["best_step"] in (2, 3) and row["best"] >= row["final"]

    # the same command again: the finished run is read back, not trained again
    log = read_log(tmp_path / "c" / "flatnce")
    (again,) = script.main(argv)
    assert again == row and read_log(tmp_path / "c" / "flatnce") == log


@pytest.mark.parametrize("config_scaling", ["sqrt", "none"])
def test_a_sweep_scales_the_learning_rate_once_by_the_trainers_rule(tiny_bert, tmp_path, config_scaling):
    """--lr_scaling sqrt from the rate at --base_batch_size 4: batch 16 trains at twice batch 4's rate, whether the
    config sets lr_scaling itself (it was scaled twice) or not."""
    import yaml

    from simcse_flat.optim import scaled_learning_rate

    script = load_script("compare_losses")
    config = _tiny_config(tmp_path, tiny_bert, f"lr_scaling: {config_scaling}\nmax_steps: 1\n")
    trained_at = {}
    for batch in (4, 16):  # one command a batch size: no plot (these runs do not evaluate)
        script.main(["--config", str(config), "--losses", "infonce", "--output_dir", str(tmp_path / "c"),
                     "--batch_sizes", str(batch), "--lr_scaling", "sqrt", "--base_batch_size", "4"])  # fmt: skip
        run = yaml.safe_load((tmp_path / "c" / f"infonce_b{batch}" / "config.yaml").read_text())
        trained_at[batch] = scaled_learning_rate(run["learning_rate"], batch, run["lr_scaling"])  # the one rule
    at_base = 1e-3 * (2.0 if config_scaling == "sqrt" else 1.0)  # the config's own rate at batch 4: 1e-3 · √4
    assert trained_at[4] == pytest.approx(at_base) and trained_at[16] == pytest.approx(2 * at_base)


def test_the_plot_skips_losses_without_scores_and_is_not_drawn_when_no_run_has_one(tmp_path):
    """A sweep with evaluation off and two batch sizes used to raise in the plot (zip of no points)."""
    script = load_script("compare_losses")
    rows = [{"loss": loss, "batch_size": b, "final": None if loss == "flatnce" else 50.0 + b}
            for loss in ("infonce", "flatnce") for b in (4, 16)]  # fmt: skip
    assert script.plot_against_batch(rows, "final", tmp_path / "plot.png", None, "t")
    assert (tmp_path / "plot.png").stat().st_size > 0
    no_scores = [{**r, "final": None} for r in rows]
    assert not script.plot_against_batch(no_scores, "final", tmp_path / "none.png", None, "t")
    assert not (tmp_path / "none.png").exists()
