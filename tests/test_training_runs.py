"""What ``train()`` does to the numbers, checked against a reference computed beside it: the schedule, clipping,
the epoch order, accumulation's gradient, supervised hard negatives, bf16, tensorboard, and two launched processes."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simcse_flat.checkpoint import checkpoint_path
from simcse_flat.config import parse_config
from simcse_flat.data.batching import SourceBatchSampler
from simcse_flat.losses import build_loss
from simcse_flat.run_folder import read_log
from simcse_flat.trainer import train
from simcse_flat.views import contrastive_loss_on_views, split_views

from conftest import WORDS, free_loopback_port
from test_trainer import _argv, _config, _losses

ROOT = Path(__file__).resolve().parents[1]


def _parameters_by_step(config) -> list[dict[str, torch.Tensor]]:
    """Train with an evaluator that copies the parameters: at the start, then after every optimizer step."""
    snapshots = []

    def snapshot(model) -> dict:
        snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return {"primary_metric": "snapshots", "snapshots": float(len(snapshots))}

    config.training.eval_steps = 1
    train(config, snapshot)
    return snapshots


def _distance(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((after[name] - before[name]).double().square().sum()) for name in before))


def test_learning_rate_warms_up_then_decays_linearly(tiny_bert, tmp_path):
    result = train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--warmup_steps", "2", "--save_steps", "0"))
    # after step k of 6 at peak 1e-3: 1e-3 * k / 2 while warming up, then 1e-3 * (6 - k) / (6 - 2)
    assert [row["lr"] for row in result.history] == pytest.approx([5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_max_grad_norm_caps_the_first_sgd_step_at_lr_times_the_norm(bert_without_dropout, tmp_path):
    # SGD's first step (its momentum buffer starts at the gradient) moves the weights by lr * g: by lr * c once the
    # gradient is clipped to norm c
    lr, clip = 0.1, 1e-3
    settings = ("--max_steps", "1", "--optim", "sgd", "--learning_rate", str(lr), "--save_steps", "0")
    before, clipped = _parameters_by_step(_config(bert_without_dropout, tmp_path / "a", *settings, "--max_grad_norm", str(clip)))
    _, unclipped = _parameters_by_step(_config(bert_without_dropout, tmp_path / "b", *settings, "--max_grad_norm", "0"))
    assert _distance(before, unclipped) > 10 * lr * clip  # the gradient is larger than the cap ...
    assert _distance(before, clipped) == pytest.approx(lr * clip, rel=1e-4)  # ... and the cap holds


def test_each_epoch_visits_every_example_once_in_a_new_order(tiny_bert, tmp_path, monkeypatch):
    import simcse_flat.trainer as trainer

    batches = []

    def recording(loss_fn, embeddings, sample_ids, *args):
        batches.append(sample_ids.tolist())
        return contrastive_loss_on_views(loss_fn, embeddings, sample_ids, *args)

    monkeypatch.setattr(trainer, "contrastive_loss_on_views", recording)
    train(_config(tiny_bert, tmp_path, "--max_steps", "15", "--save_steps", "0"))  # 3 epochs of 5 batches of 8
    epochs = [sum(batches[start : start + 5], []) for start in (0, 5, 10)]
    assert all(sorted(order) == list(range(40)) for order in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def _epoch_order(size: int, seed: int) -> list[int]:
    """The trainer's order of the examples in epoch 0 (its batches are consecutive slices of it)."""
    return [i for batch in SourceBatchSampler([size], batch_size=1, num_processes=1, seed=seed) for i in batch]


def _batch_gradient(parts, loss_fn, ids: list[int], parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Autograd gradient of the loss of one batch of ``ids``, contrasted with itself only."""
    batch = parts.collate_fn([parts.dataset[i] for i in ids])
    sample_ids = batch.pop("sample_ids")
    batch.pop("sample_keys")  # the sentences are distinct: no duplicate to mask
    loss, _ = contrastive_loss_on_views(loss_fn, parts.model(**batch), sample_ids)
    grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(parameters.items(), grads)}


def test_accumulated_gradient_is_the_mean_of_the_micro_batch_gradients(bert_without_dropout, tmp_path):
    lr = 0.1
    config = _config(bert_without_dropout, tmp_path, "--max_steps", "1", "--optim", "sgd", "--learning_rate", str(lr),
                     "--max_grad_norm", "0", "--gradient_accumulation_steps", "2", "--save_steps", "0")  # fmt: skip
    before, after = _parameters_by_step(config)
    step_gradient = {name: (before[name] - after[name]) / lr for name in before}  # SGD's first step: lr * g

    parts = config.modality.build(config, evaluate=False)  # the same encoder and data, outside the trainer (no evaluator)
    parameters = dict(parts.model.named_parameters())
    assert all(torch.equal(parameters[name], before[name]) for name in before)
    loss_fn = build_loss(config.loss.loss, temperature=config.loss.temperature)
    order = _epoch_order(len(parts.dataset), config.training.seed)
    micro = [_batch_gradient(parts, loss_fn, order[start : start + 8], parameters) for start in (0, 8)]
    whole = _batch_gradient(parts, loss_fn, order[:16], parameters)  # one batch of 16: 15 negatives per anchor
    for name in before:
        torch.testing.assert_close(step_gradient[name], (micro[0][name] + micro[1][name]) / 2, rtol=1e-3, atol=2e-6)
    # more examples, not more negatives: the step is not the gradient of the batch of 16
    assert max(float((step_gradient[name] - whole[name]).abs().max()) for name in before) > 1e-3


def test_supervised_step_weights_each_anchors_own_hard_negative(bert_without_dropout, tmp_path):
    rows = ["sent0,sent1,hard_neg"] + [f"a man {w},the man {w},no dog {WORDS[-1 - i]}" for i, w in enumerate(WORDS[:16])]
    (tmp_path / "nli.csv").write_text("\n".join(rows) + "\n")
    weight, tau = 2.0, 0.05
    config = _config(bert_without_dropout, tmp_path, "--max_steps", "1", "--save_steps", "0",
                     "--hard_negative_weight", str(weight), "--temperature", str(tau))  # fmt: skip
    config.data.train_file = str(tmp_path / "nli.csv")
    first_loss = _losses(train(config))[1]

    # the first step's loss by hand, from the untrained encoder's views of the first batch
    parts = config.modality.build(config)
    batch = parts.collate_fn([parts.dataset[i] for i in _epoch_order(16, config.training.seed)[:8]])
    batch.pop("sample_ids")
    batch.pop("sample_keys")
    with torch.no_grad():
        anchors, positives, hard = torch.nn.functional.normalize(split_views(parts.model(**batch), 8).double(), dim=-1)
    logits = anchors @ torch.cat([positives, hard]).T / tau
    logits[range(8), range(8, 16)] += weight  # SimCSE: the weight goes on anchor i's own hard negative, column B + i
    expected = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    assert first_loss == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state that fixes the precision of the first ``Accelerator``; a test that
    changes the precision starts and ends with it cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_training_follows_the_fp32_curve(bert_without_dropout, tmp_path, fresh_accelerate_state):
    settings = ("--max_steps", "6", "--save_steps", "0")
    fp32 = _losses(train(_config(bert_without_dropout, tmp_path / "a", *settings, "--mixed_precision", "no")))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    bf16 = _losses(train(_config(bert_without_dropout, tmp_path / "b", *settings, "--mixed_precision", "bf16")))
    gaps = [abs(bf16[step] - fp32[step]) for step in fp32]
    # bf16 autocast is on (its 8-bit mantissa moves the loss) and the loss, in fp32, stays on the fp32 curve
    assert sorted(bf16) == sorted(fp32) == list(range(1, 7))
    assert 0 < max(gaps) < 0.05, gaps


def test_tensorboard_gets_the_logged_losses_under_logs(tiny_bert, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_config(tiny_bert, tmp_path, "--max_steps", "3", "--save_steps", "0", "--report_to", "tensorboard"))
    # tensorboard writes the scalars to logs/RUN_NAME, the hparams of the config to a folder below it
    scalars = EventAccumulator(str(tmp_path / "run" / "logs" / "run")).Reload().Scalars("loss")
    assert [(s.step, s.value) for s in scalars] == [(step, pytest.approx(loss)) for step, loss in _losses(result).items()]


def _launch_command(argv: list[str], launcher: tuple[str, ...] = ("--multi_gpu",),
                    script: tuple[str, ...] = (str(ROOT / "train.py"),)) -> list[str]:  # fmt: skip
    """``accelerate launch LAUNCHER --num_processes 2 SCRIPT ARGV`` (default: DDP, ``--multi_gpu``, of train.py)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
            "--main_process_port", str(free_loopback_port()), *script, *argv]  # fmt: skip


def _start_launched(command: list[str], **output) -> subprocess.Popen:
    """Start ``command`` on CPUs (gloo) in a process group of its own (so the launcher and its workers can be
    killed together)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, text=True, **output)


def _kill_with_workers(launcher: int) -> None:
    """SIGKILL the launcher and every process it started (torchrun starts each worker in a session of its own, so
    killing the launcher's process group leaves them running)."""
    import psutil

    processes = [psutil.Process(launcher), *psutil.Process(launcher).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def _launch_two_processes(argv: list[str], timeout: float = 300, succeed: bool = True, **how) -> str:
    """``accelerate launch --multi_gpu --num_processes 2 train.py ARGV`` on CPUs (gloo), or as ``how`` says
    (:func:`_launch_command`); killed, with its workers, if it outlives ``timeout``. Checks that it succeeds (or,
    ``succeed=False``, fails) and returns its output."""
    launcher = _start_launched(_launch_command(argv, **how), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_with_workers(launcher.pid)
        launcher.communicate()
        raise
    assert (launcher.returncode == 0) == succeed, output[-3000:]
    return output


@pytest.mark.parametrize("loss", ["sogclr", "emc2"])
def test_two_launched_processes_train_like_one_with_twice_the_batch_and_resume_exactly(
    bert_without_dropout, tmp_path, loss
):
    # SogCLR keeps u per sample, EMC² a chain per sample: 40 sentences at 16 a step are 2 steps an epoch, so steps
    # 4-5 of the resumed run use the u / chain states that steps 1-3 left in the checkpoint (EMC²'s chain generator
    # draws for all processes' rows, each keeps its slice). No dropout: each process would draw its own masks.
    run = ("--loss", loss, "--max_steps", "5", "--save_steps", "3", "--save_total_limit", "5")
    one = _losses(train(_config(bert_without_dropout, tmp_path / "one", *run, "--per_device_train_batch_size", "16")))
    _launch_two_processes(_argv(bert_without_dropout, tmp_path / "two", *run))
    checkpoint = checkpoint_path(tmp_path / "two" / "run", 3)
    _launch_two_processes(_argv(bert_without_dropout, tmp_path / "resumed", *run, "--resume_from", str(checkpoint)))
    two = {row["step"]: row["loss"] for row in read_log(tmp_path / "two" / "run") if "loss" in row}
    resumed = {row["step"]: row["loss"] for row in read_log(tmp_path / "resumed" / "run") if "loss" in row}
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    for step in resumed:
        assert resumed[step] == pytest.approx(two[step], abs=1e-6), step
