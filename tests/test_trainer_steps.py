"""The loop's host synchronisations, counted: every Tensor method that reads a value on the host is patched, and each
call made by the step's code (simcse_flat's loop, views, gather and losses) during a micro-batch is counted.

What ``docs/design.md`` states: one read per optimizer step (the finiteness check, before the optimizer step), one per
logged row (the window's means), none per micro-batch with InfoNCE, FlatNCE, DCL or SogCLR; EMC² reads the ids it
must fetch from the data set and the checks of its chains (:data:`EMC2_READS_PER_MICRO_BATCH`).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

import simcse_flat
import simcse_flat.trainer as trainer
from simcse_flat.config import parse_config

from conftest import WORDS

# the ways a tensor's value reaches the host (``f"{t:g}"``, ``print(t)`` and the rest go through one of these)
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
PACKAGE = Path(simcse_flat.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
# the step's code: not the data (CPU tensors by design: the sampler's order, the collated ids) nor the model's forward
NOT_THE_STEP = (PACKAGE / "data", PACKAGE / "models")
EMC2_READS_PER_MICRO_BATCH = 2  # the requested samples' ids and views (1), the range check of the chains' ids (1)


class SyncCounter:
    """Counts the host reads of the step's code while :attr:`phase` names what the loop is doing."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.calls: list[tuple[str, int, str]] = []  # (phase, micro-batch, where)
        self.micro_batch = 0

    def patch(self, monkeypatch) -> None:
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, read):
        counter = self

        def counted(tensor, *args, **kwargs):
            if counter.phase is not None:
                where = counter._caller()
                if where is not None:
                    counter.calls.append((counter.phase, counter.micro_batch, where))
            return read(tensor, *args, **kwargs)

        return counted

    @staticmethod
    def _caller() -> str | None:
        """The first frame outside torch, if it is the step's code (``file:function``)."""
        frame = sys._getframe(2)
        while frame is not None and TORCH in Path(frame.f_code.co_filename).resolve().parents:
            frame = frame.f_back
        path = Path(frame.f_code.co_filename).resolve()
        if PACKAGE not in path.parents or any(part in path.parents for part in NOT_THE_STEP):
            return None
        return f"{path.relative_to(PACKAGE)}:{frame.f_code.co_name}"

    def wrap(self, monkeypatch, name: str) -> None:
        """Count inside ``trainer.NAME`` under that name."""
        real = getattr(trainer, name)
        counter = self

        def in_phase(run, *args):
            counter.phase = name
            try:
                return real(run, *args)
            finally:
                counter.phase = None
                counter.micro_batch += name == "train_step"

        monkeypatch.setattr(trainer, name, in_phase)


def _run(tiny_bert, tmp_path, monkeypatch, *extra: str) -> SyncCounter:
    """8 micro-batches: 4 optimizer steps of 2 micro-batches each, a row logged every 2 steps, no checkpoint."""
    lines = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(6)) for i in range(32)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    config = parse_config([
        "--model_name_or_path", str(tiny_bert), "--pooler", "mean", "--train_file", str(tmp_path / "train.txt"),
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "4",
        "--logging_steps", "2", "--save_steps", "0", "--report_to", "none", "--output_dir", str(tmp_path / "run"),
        *extra,
    ])  # fmt: skip
    counter = SyncCounter()
    counter.wrap(monkeypatch, "train_step")
    counter.wrap(monkeypatch, "on_step_end")
    counter.patch(monkeypatch)
    trainer.train(config)
    monkeypatch.undo()
    return counter


def _per_micro_batch(counter: SyncCounter) -> list[int]:
    counts = collections.Counter(batch for phase, batch, _ in counter.calls if phase == "train_step")
    return [counts[batch] for batch in range(counter.micro_batch)]


@pytest.mark.parametrize("loss", ["infonce", "flatnce", "dcl", "sogclr"])
def test_one_host_read_per_optimizer_step_and_one_per_logged_row(tiny_bert, tmp_path, monkeypatch, loss):
    counter = _run(tiny_bert, tmp_path, monkeypatch, "--loss", loss)
    assert counter.micro_batch == 8
    # the first micro-batch of a step reads nothing; the last reads the finiteness check, once
    assert _per_micro_batch(counter) == [0, 1] * 4, counter.calls
    assert {where for phase, _, where in counter.calls if phase == "train_step"} == {"step_metrics.py:stop_if_not"}
    logged = [where for phase, _, where in counter.calls if phase == "on_step_end"]
    assert logged == ["step_metrics.py:close"] * 2  # steps 2 and 4: the window's means, once each


def test_emc2_reads_the_samples_it_encodes_and_its_chain_checks_each_micro_batch(tiny_bert, tmp_path, monkeypatch):
    counter = _run(tiny_bert, tmp_path, monkeypatch, "--loss", "emc2")
    assert _per_micro_batch(counter) == [EMC2_READS_PER_MICRO_BATCH, EMC2_READS_PER_MICRO_BATCH + 1] * 4, counter.calls
