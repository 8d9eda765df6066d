"""Checkpoints that survive a kill at any moment, hold no pickle, and are checked before they are trusted.

A checkpoint is one folder, ``OUTPUT/checkpoint-500`` (where transformers' Trainer puts it; runs of earlier
releases, ``OUTPUT/checkpoints/checkpoint-00000500``, are still found and resumed):

=============================  ========================================================================
``model.safetensors``          the model's weights (the unwrapped model's ``state_dict``; with LoRA, the adapters;
                               under FSDP gathered onto the main process first: :mod:`~simcse_flat.sharding`)
``optimizer.{json,safetensors}``, ``scheduler.*``, ``scaler.*`` (fp16), ``loss_state.*`` (EMC²'s chains,
SogCLR's u)                    :func:`~simcse_flat.state_io.save_tree`: tensors in safetensors, the rest JSON
``rng_state_R.*``              every process's RNG (Python, NumPy, torch, CUDA) and accelerate's step
``config.yaml``                the run's resolved configuration
``manifest.json``              size and SHA-256 of every file above, and the number of processes
``trainer_state.json``         step, epoch, position in the epoch, best metric; written last
=============================  ========================================================================

Nothing is unpickled on load: a checkpoint handed over by a stranger can fail to load, never run code. Everything
is written under ``checkpoint-…​.tmp`` and renamed only when complete, so a kill mid-write leaves the previous
checkpoint as ``latest``. Before use a checkpoint is checked against its manifest (:func:`validate_checkpoint`): a
missing, truncated or swapped file (another run's RNG state, say) is named, and ``resume_from latest`` falls back
to the newest intact checkpoint, saying which it skipped. A missing or damaged RNG state is an error unless the user
says ``ignore_rng_state``: resuming with other random draws is a different run, which must never happen silently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from .run_folder import CHECKPOINT_MANIFEST, LEGACY_CHECKPOINT_DIR, write_synced
from .models.adapters import load_model_weights, save_model_weights  # LoRA: the adapters only
from .state_io import load_tree, save_tree

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = CHECKPOINT_MANIFEST
MODEL_FILE = "model.safetensors"
TREES = ("optimizer", "scheduler", "loss_state")  # always present; "scaler" only under fp16


from .errors import CheckpointError  # noqa: E402 - the core's errors (simcse_flat.errors)


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

    @classmethod
    def read(cls, path: Path) -> "TrainState":
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not readable JSON ({err})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise CheckpointError(f"{path}: expected the keys {sorted(names)}, got {got}")
        if not all(isinstance(values[k], int) and values[k] >= 0 for k in ("step", "epoch", "batch_in_epoch")):
            raise CheckpointError(f"{path}: step, epoch and batch_in_epoch must be whole numbers >= 0")
        return cls(**values)


@dataclass
class Trainables:
    """What a checkpoint restores besides :class:`TrainState`: the objects the loop trains with."""

    model: torch.nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: torch.nn.Module
    scaler: object | None = None  # fp16's GradScaler
    sharded: object | None = None  # under FSDP, the sharding module's ShardedModel: gathers what is written


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written: ``OUTPUT/checkpoint-STEP``, as transformers' Trainer names it."""
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path, only_ours: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first, in ``output_dir`` and in the ``checkpoints/`` folder earlier releases
    wrote (folders still named ``.tmp`` are not checkpoints).

    ``only_ours``: only those with our manifest. transformers' Trainer names its checkpoints the same way, and only
    ours are ever pruned, replaced, or named as the checkpoint a run can go back to.
    """
    roots = [Path(output_dir), Path(output_dir) / LEGACY_CHECKPOINT_DIR]
    found = [(int(m.group(1)), p) for root in roots if root.is_dir() for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()]  # fmt: skip
    return [p for _, p in sorted(found) if not only_ours or _written_here(p)]


# ---- writing ---------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, state: TrainState, config_yaml: str, keep_last: int,
    parts: Trainables,
) -> Path:  # fmt: skip
    """Write a checkpoint atomically (temp folder, then rename) and keep only the last ``keep_last``.

    A failed write (a full disk) removes the temp folder on every process and raises :class:`CheckpointError`;
    the checkpoints written before are untouched.
    """
    final = checkpoint_path(output_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    error = None
    if accelerator.is_main_process:
        error = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    _raise_if_any(accelerator, error, tmp, final)
    error = _attempt(lambda: save_tree(_rng_state(accelerator), tmp / f"rng_state_{accelerator.process_index}"))
    model, optimizer_state = parts.model, None
    if parts.sharded is not None:  # FSDP: every process takes part in gathering the full weights and moments
        model = parts.sharded.gather(parts.model, state.step)
        optimizer_state = parts.sharded.optimizer_state(parts.model, parts.optimizer)
    if accelerator.is_main_process and error is None:
        error = _attempt(lambda: _save_main_files(tmp, parts, config_yaml, model, optimizer_state))
    _raise_if_any(accelerator, error, tmp, final)
    if accelerator.is_main_process:
        error = _attempt(lambda: _seal(tmp, final, state, accelerator.num_processes))
        if error is None:
            for old in list_checkpoints(output_dir, only_ours=True)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    _raise_if_any(accelerator, error, tmp, final)
    return final


def _save_main_files(folder: Path, parts: Trainables, config_yaml: str, model, optimizer_state: dict | None) -> None:
    save_model_weights(model, folder / MODEL_FILE)
    save_tree(parts.optimizer.state_dict() if optimizer_state is None else optimizer_state, folder / "optimizer")
    save_tree(parts.scheduler.state_dict(), folder / "scheduler")
    save_tree(parts.loss_fn.state_dict(), folder / "loss_state")
    if parts.scaler is not None:
        save_tree(parts.scaler.state_dict(), folder / "scaler")
    (folder / "config.yaml").write_text(config_yaml)


def _seal(tmp: Path, final: Path, state: TrainState, num_processes: int) -> None:
    """Checksum every file (syncing it to disk), then write the state file last and rename the folder."""
    if final.exists() and not _written_here(final):  # another trainer's checkpoint-N: never ours to replace
        raise FileExistsError(errno.EEXIST, f"not written by simcse_flat (no {MANIFEST_FILE}): move it away or choose "
                              "another output_dir", str(final))  # fmt: skip
    files = {p.name: _describe(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"format": 1, "num_processes": num_processes, "files": files}
    write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1))
    write_synced(tmp / STATE_FILE, state.to_json())  # its presence marks a complete folder
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)


def _written_here(checkpoint: Path) -> bool:
    return (checkpoint / MANIFEST_FILE).is_file()  # written by _seal before the state file


def _rng_state(accelerator: Accelerator) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerate_step": accelerator.step,  # where gradient accumulation stands
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _attempt(write) -> str | None:
    try:
        write()
    except OSError as err:
        return f"{getattr(err, 'filename', None) or ''} {err.strerror or err}".strip()
    return None


def _raise_if_any(accelerator: Accelerator, error: str | None, tmp: Path, final: Path) -> None:
    """Every process learns whether any failed (else the others would wait for it forever)."""
    failed = torch.tensor(0.0 if error is None else 1.0, device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if float(failed) == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    earlier = [p.name for p in list_checkpoints(final.parent, only_ours=True)]
    kept = f"the earlier checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
    raise CheckpointError(f"writing {final.name} failed ({error or 'on another process'}); {kept}")


# ---- checking and reading ----------------------------------------------------------------------------------------


def validate_checkpoint(path: str | Path, num_processes: int, ignore_rng_state: bool = False) -> TrainState:
    """Check every file of the checkpoint at ``path`` against its manifest; return its :class:`TrainState`.

    Raises :class:`CheckpointError` naming the first file that is missing, truncated, changed or unreadable.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {STATE_FILE})")
    state = TrainState.read(path / STATE_FILE)
    manifest = _read_manifest(path)
    saved_processes = manifest["num_processes"]
    rng = {f"rng_state_{rank}{ext}" for rank in range(saved_processes) for ext in (".json", ".safetensors")}
    required = {MODEL_FILE, "config.yaml", *(f"{t}{ext}" for t in TREES for ext in (".json", ".safetensors")), *rng}
    missing = sorted(required - set(manifest["files"]))
    if missing:
        raise CheckpointError(f"{path / MANIFEST_FILE}: does not list {', '.join(missing)}")
    for name, expected in manifest["files"].items():
        if ignore_rng_state and name in rng:
            continue
        _check_file(path / name, expected, rng_hint=name in rng)
    if saved_processes != num_processes and not ignore_rng_state:
        raise CheckpointError(
            f"{path}: written by {saved_processes} process(es), resumed on {num_processes}: their RNG states cannot "
            "be matched; pass --ignore_rng_state to continue with fresh random draws (not an exact resume)"
        )
    _read_yaml(path / "config.yaml")
    return state


def find_checkpoint(resume_from: str, output_dir: str | Path, num_processes: int, ignore_rng_state: bool = False,
                    ) -> tuple[Path | None, list[str]]:  # fmt: skip
    """The checkpoint to resume from, and one line for each damaged checkpoint passed over.

    ``latest`` → the newest intact checkpoint of ``output_dir`` (``None`` if there is none yet); a path must be an
    intact checkpoint. Raises :class:`CheckpointError` when nothing intact is left.
    """
    if resume_from != "latest":
        validate_checkpoint(resume_from, num_processes, ignore_rng_state)
        return Path(resume_from), []
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(path, num_processes, ignore_rng_state)
            return path, skipped
        except CheckpointError as err:
            skipped.append(f"skipped {path.name}: {err}")
    if skipped:
        raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(skipped))
    return None, []


def load_checkpoint(
    accelerator: Accelerator, path: str | Path, parts: Trainables, ignore_rng_state: bool = False
) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler, loss state and this process's RNG from a checkpoint that
    :func:`validate_checkpoint` accepted; return its :class:`TrainState`."""
    path = Path(path)
    if parts.sharded is not None:  # FSDP: the main process reads, every process gets its shard
        parts.sharded.load(parts.model, parts.optimizer, lambda model: _load_weights(model, path / MODEL_FILE),
                           lambda: _tree(path / "optimizer"))  # fmt: skip
    else:
        _load_weights(parts.model, path / MODEL_FILE)
        _load_into(parts.optimizer, path / "optimizer")
    _load_into(parts.scheduler, path / "scheduler")
    _load_into(parts.loss_fn, path / "loss_state")
    if parts.scaler is not None and (path / "scaler.json").exists():
        _load_into(parts.scaler, path / "scaler")
    if not ignore_rng_state:
        _restore_rng(accelerator, _tree(path / f"rng_state_{accelerator.process_index}"))
    return TrainState.read(path / STATE_FILE)


def _load_weights(model: torch.nn.Module, file: Path) -> None:
    try:
        load_model_weights(model, file)
    except RuntimeError as err:
        raise CheckpointError(
            f"{file}: does not fit this model ({str(err).splitlines()[0]}): was it written with another "
            "model_name_or_path, pooler or architecture?"
        ) from None


def _load_into(target, stem: Path) -> None:
    try:
        target.load_state_dict(_tree(stem))
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
        raise CheckpointError(f"{stem}.json: does not fit this run ({err})") from None


def _tree(stem: Path):
    try:
        return load_tree(stem)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _restore_rng(accelerator: Accelerator, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    accelerator.step = state["accelerate_step"]


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
        assert isinstance(manifest["files"], dict) and isinstance(manifest["num_processes"], int)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (the checkpoint was written by an older release, or damaged)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise CheckpointError(f"{file}: not a valid manifest ({str(err) or 'wrong layout'})") from None
    return manifest


def _check_file(file: Path, expected: dict, rng_hint: bool) -> None:
    hint = " (pass --ignore_rng_state to resume without it: not an exact resume)" if rng_hint else ""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing{hint}")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, {expected['bytes']} when written (truncated or replaced){hint}")
    if _sha256(file) != expected["sha256"]:
        raise CheckpointError(f"{file}: changed since it was written (checksum differs){hint}")


def _read_yaml(file: Path) -> dict:
    import yaml

    try:
        values = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{file}: not readable yaml ({err})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{file}: expected a mapping of settings")
    return values


def saved_config(checkpoint: str | Path) -> dict:
    """The settings a checkpoint was written with (its ``config.yaml``)."""
    return _read_yaml(Path(checkpoint) / "config.yaml")


def changed_settings(checkpoint: str | Path, config: dict) -> list[str]:
    """``key: saved -> now`` for each setting of ``config`` that differs from the one ``checkpoint`` was saved with
    (how to resume aside): a resumed run takes the settings it is given, which a user should see."""
    saved = saved_config(checkpoint)
    ignored = {"resume_from_checkpoint", "resume_from", "overwrite_output_dir", "ignore_rng_state"}
    return [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in config.items()
            if key not in ignored and saved.get(key) != value]  # fmt: skip


def _describe(file: Path) -> dict:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())  # on disk before the state file says the checkpoint is complete
    return {"bytes": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

