"""The loop's host synchronisations, counted (:mod:`simcse_flat.host_syncs`): every Tensor method that reads a value on
the host is patched, and each call made by the step's code (simcse_flat's loop, views, gather and losses) during a
micro-batch is counted.

What ``docs/design.md`` states: one read per optimizer step (the finiteness check, before the optimizer step), one per
logged row (the window's means), none per micro-batch with InfoNCE, FlatNCE, DCL or SogCLR; EMC² reads the ids it
must fetch from the data set and the checks of its chains (:data:`EMC2_READS_PER_MICRO_BATCH`).
"""

from __future__ import annotations

import pytest
import torch

import simcse_flat.trainer as trainer
from simcse_flat.config import parse_config
from simcse_flat.host_syncs import HostSyncs, counting_host_syncs

from conftest import WORDS, load_script

EMC2_READS_PER_MICRO_BATCH = 2  # the requested samples' ids and views (1), the range check of the chains' ids (1)


def _run(tiny_bert, tmp_path, *extra: str) -> HostSyncs:
    """8 micro-batches: 4 optimizer steps of 2 micro-batches each, a row logged every 2 steps, no checkpoint."""
    lines = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(6)) for i in range(32)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    config = parse_config([
        "--model_name_or_path", str(tiny_bert), "--pooler", "mean", "--train_file", str(tmp_path / "train.txt"),
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "4",
        "--logging_steps", "2", "--save_steps", "0", "--report_to", "none", "--output_dir", str(tmp_path / "run"),
        *extra,
    ])  # fmt: skip
    with counting_host_syncs("reads") as syncs:
        trainer.train(config)
    return syncs


@pytest.mark.parametrize("loss", ["infonce", "flatnce", "dcl", "sogclr"])
def test_one_host_read_per_optimizer_step_and_one_per_logged_row(tiny_bert, tmp_path, loss):
    syncs = _run(tiny_bert, tmp_path, "--loss", loss)
    assert syncs.micro_batches == 8
    # the first micro-batch of a step reads nothing; the last reads the finiteness check, once
    assert syncs.per_micro_batch() == [0, 1] * 4, syncs.calls
    assert {where for phase, _, where in syncs.calls if phase == "train_step"} == {"step_metrics.py:stop_if_not"}
    assert syncs.at_step_ends() == ["step_metrics.py:close"] * 2  # steps 2 and 4: the window's means, once each


def test_emc2_reads_the_samples_it_encodes_and_its_chain_checks_each_micro_batch(tiny_bert, tmp_path):
    syncs = _run(tiny_bert, tmp_path, "--loss", "emc2")
    assert syncs.per_micro_batch() == [EMC2_READS_PER_MICRO_BATCH, EMC2_READS_PER_MICRO_BATCH + 1] * 4, syncs.calls


def test_the_count_leaves_torch_and_the_loop_as_they_were(tiny_bert, tmp_path):
    reads, loop = torch.Tensor.item, (trainer.train_step, trainer.on_step_end)
    with pytest.raises(RuntimeError, match="stop here"), counting_host_syncs("reads") as syncs:
        assert torch.Tensor.item is not reads and trainer.train_step is not loop[0]
        raise RuntimeError("stop here")
    assert torch.Tensor.item is reads and (trainer.train_step, trainer.on_step_end) == loop
    assert syncs.calls == [] and syncs.micro_batches == 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"), counting_host_syncs("cuda"):
            pass


def test_the_benchmark_reports_the_count_per_loss(tiny_bert, tmp_path):
    # scripts/bench_host_syncs.py: the figures docs/benchmarks.md quotes, from the same counter
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(" ".join(WORDS[i : i + 5]) for i in range(40)) + "\n")
    rows = load_script("bench_host_syncs").main(["--model", str(tiny_bert), "--train_file", str(train_file),
                                                  "--losses", "infonce", "emc2", "--batch_size", "4",
                                                  "--output", str(tmp_path / "rows.json"), "--", "--pooler", "mean"])
    infonce, emc2 = rows
    assert (infonce["first micro-batch"], infonce["last micro-batch"]) == ([0] * 4, [1] * 4)
    assert (emc2["first micro-batch"], emc2["last micro-batch"]) == ([2] * 4, [3] * 4)
    assert infonce["step ends (2 logged)"] == emc2["step ends (2 logged)"] == 2
    assert infonce["where (micro-batches)"] == "step_metrics.py:stop_if_not"
    assert (tmp_path / "rows.json").exists()
