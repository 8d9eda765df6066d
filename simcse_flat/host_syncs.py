"""The training loop's host synchronisations, counted per micro-batch and per logged row.

Only the step's code is counted (simcse_flat's loop, views, gather and losses), not the data pipeline (CPU tensors
by design) nor the model's forward. Two ways to see a synchronisation, one record:

- ``reads`` (any device): every ``Tensor`` method that reads a value on the host is patched (:data:`HOST_READS`);
- ``cuda`` (a GPU): torch's own sync debug mode (``torch.cuda.set_sync_debug_mode``) warns where CUDA itself
  synchronises (a stream wait, a copy to the host), so it should also see the operations whose output size depends
  on values (boolean indexing, ``nonzero``, ``unique``) that patching the reads cannot; not yet run on a GPU.

``tests/test_trainer_steps.py`` checks the ``reads`` count that ``docs/design.md`` states;
``scripts/bench_host_syncs.py`` reports both.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# the ways a tensor's value reaches the host (``f"{t:g}"``, ``print(t)`` and the rest go through one of these)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
PACKAGE = Path(__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
PASSED_OVER = (Path(__file__).resolve(), Path(warnings.__file__).resolve())  # this module, the warnings machinery
NOT_THE_STEP = (PACKAGE / "data", PACKAGE / "models")  # the data (CPU tensors by design) and the model's forward
PHASES = ("train_step", "on_step_end")  # the loop's two functions (simcse_flat.trainer): a micro-batch, a step's end


@dataclass
class HostSyncs:
    """The synchronisations one run made: ``(phase, micro-batch, where)`` for each, ``where`` being ``file:function``
    of the step's code; ``elsewhere`` counts those of other code (the model's forward, transformers, data)."""

    calls: list[tuple[str, int, str]] = field(default_factory=list)
    elsewhere: int = 0
    micro_batches: int = 0

    def per_micro_batch(self) -> list[int]:
        """The step's synchronisations in each micro-batch (``train_step``), in order."""
        counts = collections.Counter(batch for phase, batch, _ in self.calls if phase == "train_step")
        return [counts[batch] for batch in range(self.micro_batches)]

    def at_step_ends(self) -> list[str]:
        """Where each synchronisation of ``on_step_end`` (logging, evaluation, checkpoints) came from, in order."""
        return [where for phase, _, where in self.calls if phase == "on_step_end"]


@contextlib.contextmanager
def counting_host_syncs(how: str = "reads"):
    """Within this block, count the synchronisations of :func:`simcse_flat.trainer.train`'s steps; yields the
    :class:`HostSyncs` it fills. ``how``: ``reads`` (patched host reads) or ``cuda`` (torch's sync debug mode)."""
    from . import trainer

    if how not in ("reads", "cuda"):
        raise ValueError(f"how must be reads or cuda, got {how!r}")
    if how == "cuda" and not torch.cuda.is_available():
        raise ValueError("how='cuda' (torch's sync debug mode) needs a CUDA device; 'reads' counts on any device")
    syncs, phase = HostSyncs(), [None]

    def record() -> None:
        if phase[0] is None:
            return
        where = _step_code(sys._getframe(1))
        if where is None:
            syncs.elsewhere += 1
        else:
            syncs.calls.append((phase[0], syncs.micro_batches, where))

    def in_phase(name, real):
        def wrapped(run, *args):
            phase[0] = name
            try:
                return real(run, *args)
            finally:
                phase[0] = None
                syncs.micro_batches += name == "train_step"

        return wrapped

    def counted(read):
        def wrapped(tensor, *args, **kwargs):
            record()
            return read(tensor, *args, **kwargs)

        return wrapped

    kept = {name: getattr(trainer, name) for name in PHASES}
    reads = {name: getattr(torch.Tensor, name) for name in HOST_READS} if how == "reads" else {}
    with contextlib.ExitStack() as stack:
        for name, real in kept.items():
            setattr(trainer, name, in_phase(name, real))
            stack.callback(setattr, trainer, name, real)
        for name, read in reads.items():
            setattr(torch.Tensor, name, counted(read))
            stack.callback(setattr, torch.Tensor, name, read)
        if how == "cuda":
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("always")  # every synchronisation, not the first of each line
            shown = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if "synchronizing" in str(message):  # torch: "called a synchronizing CUDA operation"
                    record()
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        yield syncs


def _step_code(frame) -> str | None:
    """``file:function`` of the first frame outside this module, the warnings machinery and torch, if it is the
    step's code."""
    while frame is not None and _passed_over(Path(frame.f_code.co_filename).resolve()):
        frame = frame.f_back
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename).resolve()
    if PACKAGE not in path.parents or any(part in path.parents for part in NOT_THE_STEP):
        return None
    return f"{path.relative_to(PACKAGE)}:{frame.f_code.co_name}"


def _passed_over(path: Path) -> bool:
    return path in PASSED_OVER or TORCH in path.parents
