"""The accelerate loop on a tiny random BERT: loss falls, resume is exact, evaluation leaves training alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simcse_flat.checkpoint import find_checkpoint, list_checkpoints
from simcse_flat.config import parse_config
from simcse_flat.run_folder import RunFolderError, read_log
from simcse_flat.trainer import train

from conftest import WORDS


def _sentences(path: Path, n: int = 40) -> Path:
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        picks = torch.randint(len(WORDS), (6,), generator=generator).tolist()
        lines.append(" ".join(WORDS[i] for i in picks))
    path.write_text("\n".join(lines) + "\n")
    return path


def _argv(tiny_bert, tmp_path, *extra) -> list[str]:
    """``train.py``'s flags for a short run on 40 sentences written under ``tmp_path``, into ``tmp_path/run``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return [
        "--model_name_or_path", str(tiny_bert), "--train_file", str(_sentences(tmp_path / "train.txt")),
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--report_to", "none", "--output_dir", str(tmp_path / "run"), "--seed", "3", "--pooler", "mean", *extra,
    ]  # fmt: skip


def _config(tiny_bert, tmp_path, *extra):
    return parse_config(_argv(tiny_bert, tmp_path, *extra))


def _losses(result) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in result.history if "loss" in row}


def test_loss_falls_on_repeated_data(tiny_bert, tmp_path):
    result = train(_config(tiny_bert, tmp_path, "--max_steps", "30", "--loss", "infonce", "--save_steps", "0"))
    losses = list(_losses(result).values())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert (result.final_model / "modules.json").exists()


@pytest.mark.parametrize("loss", ["flatnce", "sogclr", "emc2"])
def test_resumed_run_continues_exactly(tiny_bert, tmp_path, loss):
    # 40 examples / batch 8 = 5 batches an epoch: step 3 is mid-epoch and steps 6-7 are in the next epoch, where
    # SogCLR's u and EMC²'s chains (the loss's state, saved with the checkpoint) meet samples seen before it
    full = train(_config(tiny_bert, tmp_path / "a", "--max_steps", "7", "--save_steps", "3", "--loss", loss,
                       "--save_total_limit", "5"))
    checkpoint = tmp_path / "a" / "run" / "checkpoint-3"
    resumed = train(
        _config(tiny_bert, tmp_path / "b", "--max_steps", "7", "--save_steps", "3", "--loss", loss,
                "--resume_from", str(checkpoint))
    )  # fmt: skip
    expected, got = _losses(full), _losses(resumed)
    assert sorted(got) == [4, 5, 6, 7]
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_latest_ignores_a_checkpoint_killed_mid_write(tiny_bert, tmp_path, capsys):
    train(_config(tiny_bert, tmp_path, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "5"))
    root = tmp_path / "run"
    (root / "checkpoint-6.tmp").mkdir()  # what a kill during save_checkpoint leaves
    (root / "checkpoint-6.tmp" / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]
    assert find_checkpoint("latest", tmp_path / "run", num_processes=1)[0].name == "checkpoint-4"
    # resuming "latest" of a finished run trains nothing more and keeps the final model
    capsys.readouterr()
    again = train(_config(tiny_bert, tmp_path, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "5",
                          "--resume_from", "latest", "--learning_rate", "5e-4"))  # fmt: skip
    assert again.state.step == 4 and _losses(again) == {}
    printed = capsys.readouterr().out  # a setting changed since the checkpoint is pointed out, and only that one
    assert printed.count("warning: resumed with a setting changed") == 1 and "learning_rate: 0.001 -> 0.0005" in printed


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_one_unless_told_to_overwrite(tiny_bert, tmp_path):
    train(_config(tiny_bert, tmp_path, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "5"))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(RunFolderError, match=r"holds an earlier run \(log.jsonl, final, config.yaml, checkpoint-2, checkpoint-4\)"):
        train(_config(tiny_bert, tmp_path, "--max_steps", "2"))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before  # nothing lost
    again = train(_config(tiny_bert, tmp_path, "--max_steps", "2", "--save_steps", "0", "--overwrite_output_dir"))
    # only the new run is left: "latest" can no longer pick the earlier run's step 4, and the log is this run's
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert [row["step"] for row in read_log(tmp_path / "run")] == [1, 2]
    assert again.state.step == 2


def test_save_total_limit_keeps_the_last_checkpoints(tiny_bert, tmp_path):
    train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2"))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-6"]


def test_evaluation_does_not_change_training(tiny_bert, tmp_path):
    calls = []

    def evaluator(encoder):
        torch.rand(1000)  # an evaluator that draws random numbers must still not shift the training RNG
        encoder.encode(["a man is playing guitar", "a dog is running"])
        calls.append(encoder.training)
        return {"primary_metric": "score", "score": float(len(calls))}

    plain = train(_config(tiny_bert, tmp_path / "a", "--max_steps", "6", "--save_steps", "0"))
    evaluated = train(_config(tiny_bert, tmp_path / "b", "--max_steps", "6", "--save_steps", "0", "--eval_steps", "2"), evaluator)
    assert len(calls) == 4  # the starting point, then steps 2, 4, 6
    assert _losses(plain) == pytest.approx(_losses(evaluated), abs=1e-7)
    assert (tmp_path / "b" / "run" / "best" / "modules.json").exists()
    assert evaluated.state.best_step == 6  # the score rises with each call; the starting point is never "best"
    assert "| optimizer steps | 6 |" in (tmp_path / "b" / "run" / "best" / "README.md").read_text()


def test_gradient_accumulation_steps_count_optimizer_steps(tiny_bert, tmp_path):
    result = train(_config(tiny_bert, tmp_path, "--max_steps", "3", "--gradient_accumulation_steps", "2", "--save_steps", "0"))
    # 5 micro-batches an epoch: steps take 2 + 2 + 1 (the end of the data closes a step early, as accelerate does)
    assert result.state.step == 3
    assert (result.state.epoch, result.state.batch_in_epoch) == (0, 5)


def _log_by_step(run_dir: Path) -> dict[int, float]:
    """Training loss per step from log.jsonl, whose steps must each appear once: a resumed run drops the rows
    logged after its checkpoint before it logs those steps again."""
    rows = [row for row in read_log(run_dir) if "loss" in row]
    assert len({row["step"] for row in rows}) == len(rows), "a step logged twice"
    return {row["step"]: row["loss"] for row in rows}


def _past_a_checkpoint(run: Path) -> bool:
    """Whether the run logged steps its last checkpoint does not hold (a kill now loses them)."""
    checkpoints = list_checkpoints(run)
    return bool(checkpoints) and read_log(run)[-1]["step"] > int(checkpoints[-1].name.split("-")[1])


def kill_past_a_checkpoint(victim, run: Path, kill=None, timeout: float = 120) -> None:
    """SIGKILL the training process ``victim`` (or call ``kill``) once it logged past a checkpoint: no cleanup, no
    final save, as a pre-empted job dies."""
    import signal
    import time

    deadline = time.time() + timeout
    while not _past_a_checkpoint(run) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    if kill is not None:
        kill()
    else:
        victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert _past_a_checkpoint(run), "the run ended before it logged past its first checkpoint"
    assert not (run / "final").exists()


def test_run_killed_mid_training_resumes_to_the_same_curve(tiny_bert, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = _sentences(tmp_path / "train.txt")

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(root / "train.py"), "--model_name_or_path", str(tiny_bert), "--pooler", "mean",
                "--train_file", str(data), "--per_device_train_batch_size", "8", "--max_steps", "120",
                "--save_steps", "20", "--save_total_limit", "10", "--logging_steps", "1", "--report_to", "none",
                "--learning_rate", "1e-3", "--seed", "3", "--output_dir", str(out), *extra]  # fmt: skip

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True)
    victim = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_past_a_checkpoint(victim, tmp_path / "killed")
    subprocess.run(command(tmp_path / "killed", "--resume_from", "latest"), check=True, capture_output=True)
    whole, resumed = _log_by_step(tmp_path / "whole"), _log_by_step(tmp_path / "killed")
    assert sorted(resumed) == sorted(whole) == list(range(1, 121))
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], abs=1e-6), step


def test_a_logged_row_is_the_mean_over_its_window_of_steps(tiny_bert, tmp_path):
    """logging_steps 3: the row of step 3 is the mean of steps 1-3 as logged one by one, and of each step's two
    micro-batches (accumulation 2), as transformers' Trainer averages the window; not the last step alone."""
    flags = ("--max_steps", "4", "--save_steps", "0", "--gradient_accumulation_steps", "2", "--loss", "flatnce",
             "--per_device_train_batch_size", "4")  # 10 micro-batches an epoch: every step has its two
    every = train(_config(tiny_bert, tmp_path / "every", *flags)).history
    windows = train(_config(tiny_bert, tmp_path / "windows", *flags, "--logging_steps", "3")).history
    assert [row["step"] for row in windows] == [3, 4]
    for key in ("loss", "infonce", "accuracy", "positive_logit"):
        by_step = [row[key] for row in every]
        assert windows[0][key] == pytest.approx(sum(by_step[:3]) / 3, rel=1e-5), key
        assert windows[1][key] == pytest.approx(by_step[3], rel=1e-5), key  # the last step: a window of one
    assert len({round(row["loss"], 6) for row in every[:3]}) == 3  # the steps differ: the mean is not any of them


def test_resuming_a_finished_run_keeps_the_evaluation_on_its_final_card(tiny_bert, tmp_path):
    calls = []

    def evaluator(encoder):
        calls.append(1)
        return {"primary_metric": "stsb_spearman", "stsb_spearman": 40.0 + len(calls), "stsb_n_pairs": 10}

    flags = ("--max_steps", "2", "--save_steps", "2", "--eval_steps", "2")
    train(_config(tiny_bert, tmp_path, *flags), evaluator)
    final = tmp_path / "run" / "final"
    card, results = (final / "README.md").read_text(), (final / "eval_results.json").read_text()
    assert "| spearman_cosine | 0.42 " in card and '"stsb_spearman": 42.0' in results  # step 0, then step 2
    again = train(_config(tiny_bert, tmp_path, *flags, "--resume_from", "latest"), evaluator)
    assert again.state.step == 2 and len(calls) == 2  # nothing trained, nothing evaluated again
    assert (final / "README.md").read_text() == card and (final / "eval_results.json").read_text() == results


@pytest.mark.parametrize("optim", ["adamw", "sgd", "lars"])
def test_weight_decay_reaches_the_weight_matrices_and_not_biases_or_norms(tiny_bert, tmp_path, optim):
    """One step with zero gradients moves a parameter by its weight decay alone: every weight matrix of the model
    shrinks, no bias or LayerNorm parameter moves; without weight decay nothing moves."""
    from simcse_flat.models.text import SentenceEncoder
    from simcse_flat.optim import build_optimizer
    from simcse_flat.run import _param_groups

    for decay in (0.1, 0.0):
        args = _config(tiny_bert, tmp_path, "--optim", optim, "--weight_decay", str(decay)).training
        model = SentenceEncoder.from_pretrained(str(tiny_bert), pooler="mean")
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = build_optimizer(_param_groups(model, args.weight_decay), args, torch.device("cpu"), 8)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
        matrices = {name for name, p in model.named_parameters() if p.ndim >= 2}
        assert any("LayerNorm" in name for name in before) and any(name.endswith("bias") for name in before)
        assert moved == (matrices if decay else set()), (optim, decay)
        for name in moved:  # shrunk toward 0, not pushed anywhere else
            assert model.get_parameter(name).norm() < before[name].norm()


def test_a_run_folder_written_with_both_modalities_settings_resumes_without_a_changed_setting(
    tiny_bert, tmp_path, monkeypatch, capsys
):
    """Before the modality owned its settings, every ``config.yaml`` held vision's too (``arch: resnet18`` in a
    text run): such a run resumes, exactly, and names no setting as changed."""
    import dataclasses
    import shutil

    import yaml

    import simcse_flat.run as run_module
    from simcse_flat.modalities import VisionArguments

    full = train(_config(tiny_bert, tmp_path / "a", "--max_steps", "3", "--save_steps", "2"))
    current = run_module._config_yaml
    earlier = {f.name: f.default for f in dataclasses.fields(VisionArguments)}
    monkeypatch.setattr(run_module, "_config_yaml", lambda config: current(config) + yaml.safe_dump(earlier))
    train(_config(tiny_bert, tmp_path / "b", "--max_steps", "3", "--save_steps", "2"))
    assert "arch" in yaml.safe_load((tmp_path / "b" / "run" / "checkpoint-2" / "config.yaml").read_text())
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoint-3")  # as if killed after step 2
    monkeypatch.undo()
    capsys.readouterr()
    resumed = train(_config(tiny_bert, tmp_path / "b", "--max_steps", "3", "--save_steps", "2",
                            "--resume_from", "latest"))  # fmt: skip
    out = capsys.readouterr().out
    assert "resumed from" in out and "changed since" not in out
    assert _losses(resumed)[3] == pytest.approx(_losses(full)[3], abs=1e-6)
