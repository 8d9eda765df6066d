"""Checkpoints that survive a kill at any moment, and resuming from them.

A checkpoint is one folder ``OUTPUT/checkpoints/checkpoint-00000500``. ``accelerate``'s ``save_state`` writes the
weights (safetensors), optimizer, gradient scaler, every process's RNG, and the objects registered for
checkpointing (scheduler, loss state); we add ``trainer_state.json`` (step, epoch, position in the epoch, best
metric) and the resolved ``config.yaml``. Everything is written under ``checkpoint-…​.tmp`` and renamed only when
complete, so a run killed mid-write leaves the previous checkpoint as ``latest`` and a ``.tmp`` that the next save
removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the path."""


@dataclass
class TrainState:
    """Where the run is: enough to continue it exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (the sampler's permutation is a function of seed and epoch)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed, per process
    best_metric: float | None = None
    best_step: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (whether or not it was written)."""
    return checkpoint_root(output_dir) / f"checkpoint-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders still named ``.tmp`` are not checkpoints)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def resolve_resume_path(resume_from: str, output_dir: str | Path) -> Path | None:
    """``latest`` → newest checkpoint of ``output_dir`` (``None`` if there is none yet); a path must exist."""
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"resume_from={resume_from!r}: no checkpoint there (missing {STATE_FILE})")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: TrainState, config_yaml: str, keep_last: int) -> Path:
    """Write a checkpoint atomically (temp folder, then rename) and keep only the last ``keep_last``."""
    final = checkpoint_path(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_yaml)
        _write_synced(tmp / STATE_FILE, state.to_json())  # written last: its presence marks a complete folder
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> TrainState:
    """Restore model, optimizer, scaler, RNG and registered objects; return the saved :class:`TrainState`."""
    accelerator.load_state(str(path))
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text()))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder to fill; at the end it replaces ``path`` in one rename.

    An exception (or a kill) leaves ``path`` as it was: a half-written model never stands where a finished one did.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        folder = scratch / "folder"
        folder.mkdir()
        yield folder
        if path.exists():
            shutil.rmtree(path)
        folder.rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
