"""The folders simcse_flat writes, and the rule behind all of them: never delete what the project did not write.

* A **run folder** (``output_dir``) belongs to one run: ``checkpoint-N/``, ``log.jsonl``, ``best/``, ``final/``,
  ``logs/`` and ``config.yaml`` hold that run only. :func:`preflight_output_dir` checks it can be written (and has
  room for a checkpoint) before anything heavy loads; :class:`RunLock` keeps a second job out while one runs;
  :func:`check_earlier_run` refuses to start over an earlier run unless told to; :func:`start_run_folder` clears
  what the trainer itself wrote and a kill left behind. What is ours is vouched for, never guessed from a name: a
  checkpoint by its ``manifest.json``, ``best/`` and ``final/`` by their ``simcse_flat.json``, the plain files and
  ``logs/`` by the run folder's ``.simcse_flat_run.json`` (written before any of them). A folder holding anything
  under those names that nothing vouches for (a transformers Trainer's ``checkpoint-500/``) is refused untouched.
* An **exported model folder** is written whole by :func:`write_folder_atomically`: into a hidden sibling, then
  renamed into place, with ``simcse_flat.json`` listing every file it wrote. A destination that holds anything
  else is refused untouched; an earlier export of ours is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LEGACY_CHECKPOINT_DIR = "checkpoints"  # where releases before transformers' layout put checkpoint-00000500
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+(\.tmp)?$")  # OUTPUT/checkpoint-500, as transformers' Trainer
LOG_FILE = "log.jsonl"
LOCK_FILE = ".simcse_flat.lock"
RUN_OUTPUTS = (LEGACY_CHECKPOINT_DIR, LOG_FILE, "best", "final", "logs", "config.yaml")  # what the trainer writes
RESULTS = (LEGACY_CHECKPOINT_DIR, "best", "final")  # what a user would lose: a run that has none of these left nothing
EXPORT_MARKER = "simcse_flat.json"  # in every exported folder; its "files" lists what we wrote there
RUN_MARKER = ".simcse_flat_run.json"  # in a run folder; its "files" lists the plain outputs (RUN_FILES) we write
RUN_FILES = (LOG_FILE, "logs", "config.yaml")  # vouched for by RUN_MARKER; checkpoints and exports by their own
CHECKPOINT_MANIFEST = "manifest.json"  # in every checkpoint we write (simcse_flat.checkpoint)


from .errors import RunFolderError  # noqa: E402 - the core's errors (simcse_flat.errors)


# ---- the run folder -----------------------------------------------------------------------------------------------


def preflight_output_dir(output_dir: str | Path, needed_bytes: int | None = None) -> Path:
    """Create ``output_dir`` if needed and prove it writable, with room for ``needed_bytes``: the folder problems a
    run would otherwise meet at its first checkpoint, minutes or hours in (a file in the way, a read-only
    mount, a symlink loop, a full disk), reported before the model loads."""
    path = Path(output_dir)
    if path.is_symlink() and not path.exists():
        raise RunFolderError(f"output_dir {path} is a symlink that leads nowhere (broken, or a loop): choose a folder")
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == path else f"lies under {parent}, which is a file"
            raise RunFolderError(f"output_dir {path} {what}: choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise RunFolderError(f"output_dir {path}: cannot write there ({err.strerror or err})") from None
    if needed_bytes:
        free = shutil.disk_usage(path).free
        if free < needed_bytes:
            raise RunFolderError(
                f"output_dir {path}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
                f"{needed_bytes / 2**20:.0f} MiB: free some space or choose another folder"
            )
    return path


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.simcse_flat.lock``, held while the run lives.

    The kernel drops it when the process ends, however it ends (SIGKILL included), so a killed run never leaves a
    stale lock; a second job on the same folder (a resume started while the first still runs) is refused.
    :meth:`release` deletes the file while still holding the lock, so a run (finished, or stopped by an error) leaves
    no lock file behind; :meth:`acquire` therefore checks that the file it locked is still the one at the path.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, as before
            return self
        while True:
            handle = self._lock_file(fcntl)
            try:  # a job that released in between deleted the file we locked: lock the new one
                if os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._handle = handle
        return self

    def _lock_file(self, fcntl):
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RunFolderError(
                    f"output_dir {self.path.parent} is in use by a running job ({holder}): wait for it to end, or "
                    "choose another output_dir"
                ) from None
            raise
        return handle

    def release(self) -> None:
        if self._handle is not None:
            try:
                self.path.unlink()  # while locked: no other job holds this file
            except FileNotFoundError:
                pass
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def earlier_run(output_dir: str | Path) -> list[str]:
    """The names of what an earlier run left in ``output_dir`` (empty if none)."""
    folder = Path(output_dir)
    checkpoints = sorted(p.name for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)) if folder.is_dir() else []
    return [name for name in RUN_OUTPUTS if (folder / name).exists()] + checkpoints


def check_earlier_run(output_dir: str | Path, resume_from: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over an earlier one that left results: ``resume_from latest`` would later take
    the earlier run's checkpoints for this run's, and the two logs would mix. A run that stopped before its first
    checkpoint left nothing to resume and no model (a config and perhaps a few log rows): starting over it is
    allowed."""
    found = earlier_run(output_dir)
    if not resume_from:
        _refuse_foreign(output_dir, found)
    if any(name in RESULTS or CHECKPOINT_NAME.match(name) for name in found) and not resume_from and not overwrite:
        raise RunFolderError(
            f"output_dir {output_dir} holds an earlier run ({', '.join(found)}): continue it with --resume_from_checkpoint "
            "latest, start over with --overwrite_output_dir (deletes those), or choose another output_dir"
        )


def start_run_folder(output_dir: str | Path, step: int, writes: tuple[str, ...] = RUN_FILES) -> None:
    """Make ``output_dir`` hold this run only (main process). A run starting at step 0 removes what an earlier one
    left (``check_earlier_run`` allowed it), and only what is vouched ours: anything else is refused untouched; a
    run resumed at ``step`` drops the log rows written after its checkpoint, since it logs those steps again. Either
    way, scratch folders a kill left are cleared, and ``.simcse_flat_run.json`` lists ``writes``, the plain outputs
    this run will write (with those of the run it continues), before it writes any."""
    output_dir = Path(output_dir)
    _clear_scratch(output_dir)
    claimed: set[str] = set()
    if step == 0:
        found = earlier_run(output_dir)
        _refuse_foreign(output_dir, found)
        for name in found:
            _remove(output_dir / name)
    else:
        claimed = set(_run_files(output_dir))
        if (output_dir / LOG_FILE).exists():
            kept = "".join(json.dumps(row) + "\n" for row in read_log(output_dir) if row["step"] <= step)
            write_text_atomically(output_dir / LOG_FILE, kept)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / RUN_MARKER, json.dumps({"files": sorted(claimed | set(writes))}) + "\n")


def foreign_outputs(output_dir: str | Path, found: list[str] | None = None) -> list[str]:
    """The entries of ``output_dir`` under a name the trainer writes that nothing vouches ours (see the module's
    docstring), each with why: what ``overwrite_output_dir`` must not delete."""
    folder = Path(output_dir)
    found = earlier_run(folder) if found is None else found
    claimed = set(_run_files(folder))
    foreign = []
    for name in found:
        path = folder / name
        if name in RUN_FILES:
            if name not in claimed:
                foreign.append(f"{name} (not listed in {RUN_MARKER})")
        elif CHECKPOINT_NAME.match(name) or name == LEGACY_CHECKPOINT_DIR:
            inside = [path] if name != LEGACY_CHECKPOINT_DIR else sorted(path.iterdir()) if path.is_dir() else [path]
            strangers = [p for p in inside if not _our_checkpoint(p)]
            if strangers:
                shown = name if name != LEGACY_CHECKPOINT_DIR else f"{name}/{strangers[0].name}"
                foreign.append(f"{shown} (no {CHECKPOINT_MANIFEST} of simcse_flat)")
        elif path.is_symlink() or not path.is_dir():
            foreign.append(f"{name} (not a folder of ours)")
        else:  # best/, final/: an export, every file listed in its simcse_flat.json
            ours = set(_exported_files(path))
            if any(str(p.relative_to(path)) not in ours for p in path.rglob("*") if not p.is_dir()):
                foreign.append(f"{name} (files not listed in its {EXPORT_MARKER})")
    return foreign


def _refuse_foreign(output_dir: str | Path, found: list[str]) -> None:
    foreign = foreign_outputs(output_dir, found)
    if foreign:
        raise RunFolderError(
            f"output_dir {output_dir} holds {', '.join(foreign)}, which simcse_flat did not write; nothing was "
            "deleted: move it away or choose another output_dir"
        )


def _our_checkpoint(path: Path) -> bool:
    """A checkpoint we sealed (its manifest), or the scratch folder of one a kill interrupted (``.tmp``)."""
    if path.is_symlink() or not path.is_dir() or not CHECKPOINT_NAME.match(path.name):
        return False
    return path.name.endswith(".tmp") or (path / CHECKPOINT_MANIFEST).is_file()


def _run_files(output_dir: Path) -> list[str]:
    try:
        files = json.loads((Path(output_dir) / RUN_MARKER).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in files if name in RUN_FILES] if isinstance(files, list) else []


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
                raise RunFolderError(f"{path}, line {number}: not a JSON row") from None
    return rows


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename: a kill leaves the old file or the
    new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_synced(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` and wait until it is on disk."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# ---- exported folders -----------------------------------------------------------------------------------------------


def check_destination(path: str | Path, overwrite: bool = False) -> None:
    """Raise unless ``path`` may receive an exported folder: missing, empty, or an earlier export of ours (then only
    with ``overwrite``). Nothing is changed either way."""
    path = Path(path)
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise RunFolderError(f"{path}: the destination is the current folder or holds it; name a new folder")
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise RunFolderError(f"{path}: exists and is not a folder; name a new folder")
    present = sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())
    if not present:
        return
    ours = set(_exported_files(path))
    foreign = [name for name in present if name not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunFolderError(
            f"{path}: holds files simcse_flat did not write ({shown}); nothing was changed: export into a new or "
            "empty folder"
        )
    if not overwrite:
        raise RunFolderError(f"{path}: holds an earlier export; pass --overwrite to replace it, or name a new folder")


@contextmanager
def write_folder_atomically(path: str | Path, overwrite: bool = False, metadata: dict | None = None) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it takes ``path``'s place in one rename, with ``simcse_flat.json``
    (``metadata`` plus the list of files written).

    ``path`` is checked first (:func:`check_destination`): nothing the project did not write is ever removed. An
    exception or a kill leaves ``path`` as it was; a kill leaves a hidden ``.NAME.tmp-*`` beside it, which the
    next run into that run folder removes.
    """
    path = Path(path)
    check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        folder = scratch / "folder"
        folder.mkdir()
        yield folder
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
        marker = {**(metadata or {}), "files": [*files, EXPORT_MARKER]}
        (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=2))
        if path.exists():
            check_destination(path, overwrite)  # nothing crept in while we wrote
            os.replace(path, scratch / "old")  # aside first: a kill between the renames loses nothing
        os.replace(folder, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def add_files_to_export(path: str | Path, texts: dict[str, str]) -> None:
    """Write text files (a model card, results) into an exported folder and list them in its ``simcse_flat.json``,
    so that a later replacement knows them for ours."""
    path = Path(path)
    marker = json.loads((path / EXPORT_MARKER).read_text())
    for name, text in texts.items():
        write_text_atomically(path / name, text)
    marker["files"] = sorted({*marker.get("files", []), *texts})
    write_text_atomically(path / EXPORT_MARKER, json.dumps(marker, indent=2))


def _exported_files(path: Path) -> list[str]:
    try:
        return list(json.loads((path / EXPORT_MARKER).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return []


def _clear_scratch(output_dir: Path) -> None:
    """Remove what a kill left mid-write: the scratch folders of interrupted exports (``.best.tmp-*``,
    ``.final.tmp-*``; ``final.tmp-*`` from earlier releases) and half-written files (``.log.jsonl.tmp-*``). A
    scratch folder holding the earlier export set aside (``old``) while ``best``/``final`` is missing gives it back."""
    if not output_dir.is_dir():
        return
    for scratch in [*output_dir.glob(".*.tmp-*"), *output_dir.glob("best.tmp-*"), *output_dir.glob("final.tmp-*")]:
        target = output_dir / scratch.name.lstrip(".").split(".tmp-")[0]
        if target.name not in RUN_OUTPUTS:
            continue  # not ours
        if scratch.is_dir():
            if (scratch / "old").is_dir() and not target.exists():
                os.replace(scratch / "old", target)
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            scratch.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
