"""What the loop measures, kept on the device: the logged window's sums and whether a step stayed finite.

Each micro-batch adds to both without a host synchronisation. The host reads them in two places only: the
finiteness check, once per optimizer step (:meth:`Finiteness.stop_if_not`, one read), and the window's means, once
per logged row (:meth:`Window.close`, one read). ``tests/test_trainer_steps.py`` counts the reads.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoint import TrainState, list_checkpoints
from .errors import TrainingDiverged


class Finiteness:
    """Whether a NaN or infinity appeared in this step's losses or gradient norm, kept on the device: each
    micro-batch adds to it without a host synchronisation, and :meth:`stop_if_not` reads it once a step, before the
    optimizer step, so the run stops, on every process at once, before it reaches the weights or a checkpoint."""

    WHAT = ("loss", "gradient norm")

    def __init__(self, device: torch.device) -> None:
        self.count = torch.zeros(len(self.WHAT), device=device)  # non-finite values this step, by kind
        self.first = torch.zeros(len(self.WHAT), device=device)  # the first of them, for the message

    def note(self, what: str, value: torch.Tensor) -> None:
        slot, value = self.WHAT.index(what), value.detach().float().reshape(())
        bad = torch.logical_not(torch.isfinite(value))
        self.first[slot] = torch.where(bad & (self.count[slot] == 0), value, self.first[slot])
        self.count[slot] += bad.float()

    def stop_if_not(self, accelerator: Accelerator, state: TrainState, output_dir: Path) -> None:
        everywhere = accelerator.reduce(self.count, reduction="sum") if accelerator.num_processes > 1 else self.count
        kinds = len(self.WHAT)
        read = torch.cat([everywhere, self.count, self.first]).tolist()  # the step's one read
        counts, local, first = read[:kinds], read[kinds : 2 * kinds], read[2 * kinds :]
        self.count.zero_()
        self.first.zero_()
        if not any(counts):
            return
        slot = 0 if counts[0] else 1
        value = f"{first[slot]:g}" if local[slot] else "non-finite on another process"
        checkpoints = list_checkpoints(output_dir, only_ours=True)
        kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"the {self.WHAT[slot]} became {value} at step {state.step + 1}; stopped before updating the weights "
            f"({kept}). Lower learning_rate, raise temperature, or check the data."
        )


class Window:
    """The metrics of every micro-batch since the last logged row, summed on the device, and the wall time since."""

    def __init__(self, step: int) -> None:
        self._restart(step, time.perf_counter())

    def _restart(self, step: int, now: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0  # micro-batches in the sums
        self.start, self.step = now, step

    def add(self, metrics: dict) -> None:
        """One micro-batch's metrics, added on the device: no host synchronisation here."""
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.batches += 1

    def close(self, accelerator: Accelerator, step: int) -> tuple[dict[str, float], float]:
        """The mean of every metric over the window's micro-batches and over the processes (one all-reduce for all
        of them, and the one read on the host), and the seconds per step; the next window starts at ``step``."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k].to(accelerator.device).reshape(()) for k in keys]) / max(self.batches, 1)
        means = dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist()))
        now = time.perf_counter()
        seconds_per_step = (now - self.start) / (step - self.step)
        self._restart(step, now)
        return means, seconds_per_step
