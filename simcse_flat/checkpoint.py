"""Checkpoints that survive a kill at any moment, and resuming from them.

A run owns its ``output_dir``: ``checkpoints/``, ``log.jsonl``, ``best/``, ``final/``, ``logs/`` and ``config.yaml``
hold that run only (:func:`check_output_dir`, :func:`start_run_folder`). A checkpoint is one folder
``OUTPUT/checkpoints/checkpoint-00000500``. ``accelerate``'s ``save_state`` writes the
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
LOG_FILE = "log.jsonl"
RUN_OUTPUTS = (CHECKPOINT_DIR, LOG_FILE, "best", "final", "logs", "config.yaml")  # what the trainer writes
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, or an output folder a run cannot start in; the message names the
    path."""


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


def changed_settings(checkpoint: str | Path, config: dict) -> list[str]:
    """``key: saved -> now`` for each setting of ``config`` that differs from the one ``checkpoint`` was saved with
    (how to resume aside): a resumed run takes the settings it is given, which a user should see."""
    import yaml

    saved_file = Path(checkpoint) / "config.yaml"
    if not saved_file.exists():
        return []
    saved = yaml.safe_load(saved_file.read_text()) or {}
    ignored = {"resume_from", "overwrite_output_dir"}
    return [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in config.items()
            if key not in ignored and saved.get(key) != value]  # fmt: skip


def earlier_run(output_dir: str | Path) -> list[str]:
    """The names of what an earlier run left in ``output_dir`` (empty if none)."""
    return [name for name in RUN_OUTPUTS if (Path(output_dir) / name).exists()]


def check_output_dir(output_dir: str | Path, resume_from: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over an earlier one: ``resume_from latest`` would later take the earlier run's
    checkpoints for this run's, and the two logs would mix. Resuming, or ``overwrite``, says what to do instead."""
    found = earlier_run(output_dir)
    if found and not resume_from and not overwrite:
        raise CheckpointError(
            f"output_dir {output_dir} holds an earlier run ({', '.join(found)}): continue it with --resume_from "
            "latest, start over with --overwrite_output_dir (deletes those), or choose another output_dir"
        )


def start_run_folder(output_dir: str | Path, step: int) -> None:
    """Make ``output_dir`` hold this run only, on the main process. A run starting at step 0 removes what an earlier
    one left (``check_output_dir`` allowed it); a run resumed at ``step`` drops the log rows written after its
    checkpoint, since it logs those steps again."""
    output_dir = Path(output_dir)
    if step == 0:
        for name in earlier_run(output_dir):
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    elif (output_dir / LOG_FILE).exists():
        kept = [json.dumps(row) + "\n" for row in read_log(output_dir) if row["step"] <= step]
        tmp = output_dir / (LOG_FILE + ".tmp")
        _write_synced(tmp, "".join(kept))
        os.replace(tmp, output_dir / LOG_FILE)
    output_dir.mkdir(parents=True, exist_ok=True)


def read_log(output_dir: str | Path) -> list[dict]:
    """The rows of ``log.jsonl`` (one per logged step or evaluation); a last line cut off by a kill is skipped."""
    path = Path(output_dir) / LOG_FILE
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise CheckpointError(f"{path}, line {number}: not a JSON row") from None
    return rows


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
