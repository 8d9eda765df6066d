"""Checkpoints: no pickle anywhere, every file checked before use, damage named, ``latest`` falls back to the newest
intact checkpoint, and a run stops on a NaN or a failed write keeping its last good checkpoint."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from simcse_flat.checkpoint import CheckpointError, find_checkpoint, list_checkpoints
from simcse_flat.errors import TrainingDiverged
from simcse_flat.trainer import train

from test_trainer import _config, _losses

PACKAGE = Path(__file__).resolve().parents[1] / "simcse_flat"


@pytest.fixture(scope="module")
def finished_run(tiny_bert, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """A 6-step run with a checkpoint every 2 steps, and its loss per step: what damaged copies are compared with."""
    root = tmp_path_factory.mktemp("finished")
    result = train(_config(tiny_bert, root, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5",
                           "--loss", "sogclr"))  # fmt: skip  (a stateful loss: its state must come back too)
    return root, _losses(result)


def _copy(finished_run, tmp_path: Path) -> Path:
    """A copy of the finished run's folder as a run killed after step 5 would leave it (no checkpoint 6, no final)."""
    shutil.copytree(finished_run[0], tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    shutil.rmtree(tmp_path / "run" / "final")
    return tmp_path / "run"


def test_a_checkpoint_holds_only_safetensors_json_and_yaml(finished_run):
    files = {p.name for p in (finished_run[0] / "run" / "checkpoint-4").iterdir()}
    assert {Path(name).suffix for name in files} == {".safetensors", ".json", ".yaml"}, files
    assert {"model.safetensors", "loss_state.safetensors", "rng_state_0.json", "manifest.json"} <= files


def test_the_package_never_unpickles():
    """What ``grep -rn "weights_only=False|pickle" simcse_flat`` must not find: code that loads a pickle."""
    loading = re.compile(
        r"import pickle|pickle\.load|Unpickler|weights_only\s*=\s*False|torch\.load\((?!.*weights_only=True)"
        r"|\.load_state\(|import dill|cloudpickle"
    )
    found = [f"{path.name}:{n}: {line.strip()}" for path in PACKAGE.rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if loading.search(line)]  # fmt: skip
    assert found == []


def test_resuming_unpickles_nothing_and_continues_exactly(finished_run, tiny_bert, tmp_path, monkeypatch):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoint-4" / "custom_checkpoint_0.pkl").write_bytes(_payload(tmp_path / "pwned"))

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    import pickle

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    resumed = train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5",
                            "--loss", "sogclr", "--resume_from", "latest"))  # fmt: skip
    assert not (tmp_path / "pwned").exists()
    expected = finished_run[1]
    assert sorted(_losses(resumed)) == [5, 6]
    for step, loss in _losses(resumed).items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step


def test_a_run_in_the_earlier_layout_resumes_and_continues_in_transformers_layout(finished_run, tiny_bert, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints").mkdir()
    for step in (2, 4):  # where earlier releases wrote them: OUTPUT/checkpoints/checkpoint-00000004
        (run / f"checkpoint-{step}").rename(run / "checkpoints" / f"checkpoint-{step:08d}")
    resumed = train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5",
                            "--loss", "sogclr", "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert sorted(_losses(resumed)) == [5, 6]  # from checkpoints/checkpoint-00000004
    for step, loss in _losses(resumed).items():
        assert loss == pytest.approx(finished_run[1][step], abs=1e-6), step
    assert (run / "checkpoint-6" / "trainer_state.json").exists()  # the new one where transformers' Trainer puts it


def test_a_hostile_file_that_matches_its_manifest_fails_to_load_and_runs_nothing(finished_run, tiny_bert, tmp_path):
    run = _copy(finished_run, tmp_path)
    checkpoint = run / "checkpoint-4"
    for name in ("loss_state.safetensors", "optimizer.json"):
        (checkpoint / name).write_bytes(_payload(tmp_path / "pwned"))
    _reseal(checkpoint)  # the manifest now vouches for the planted files: only the loader stands in the way
    with pytest.raises(CheckpointError, match=r"optimizer\.json: cannot read it"):
        train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--loss", "sogclr", "--resume_from", str(checkpoint)))
    assert not (tmp_path / "pwned").exists()


# each: a file of checkpoint-4, what happens to it, and what the error must say
DAMAGE = [
    ("model.safetensors", "truncate", r"model\.safetensors: \d+ bytes, \d+ when written"),
    ("optimizer.safetensors", "delete", r"optimizer\.safetensors: missing"),
    ("optimizer.json", "truncate", r"optimizer\.json: \d+ bytes"),
    ("scheduler.json", "truncate", r"scheduler\.json: \d+ bytes"),
    ("loss_state.json", "delete", r"loss_state\.json: missing"),
    ("rng_state_0.safetensors", "garbage", r"rng_state_0\.safetensors: changed since it was written .*--ignore_rng_state"),
    ("rng_state_0.json", "delete", r"rng_state_0\.json: missing .*--ignore_rng_state"),
    ("rng_state_0.safetensors", "swapped", r"rng_state_0\.safetensors: changed since it was written"),
    ("config.yaml", "garbage", r"config\.yaml: changed since it was written"),
    ("trainer_state.json", "garbage", r"trainer_state\.json: not readable JSON"),
    ("trainer_state.json", "extra_key", r"trainer_state\.json: expected the keys"),
    ("manifest.json", "delete", r"manifest\.json: missing"),
]


@pytest.mark.parametrize(("name", "damage", "message"), DAMAGE, ids=[f"{n}-{d}" for n, d, _ in DAMAGE])
def test_damage_is_named_and_latest_falls_back_to_the_newest_intact_checkpoint(finished_run, tmp_path, name, damage, message):
    run = _copy(finished_run, tmp_path)
    checkpoint = run / "checkpoint-4"
    _damage(checkpoint / name, damage, finished_run[0])
    with pytest.raises(CheckpointError, match=message):
        find_checkpoint(str(checkpoint), run, num_processes=1)
    path, skipped = find_checkpoint("latest", run, num_processes=1)
    assert path.name == "checkpoint-2"
    assert len(skipped) == 1 and skipped[0].startswith("skipped checkpoint-4: ") and re.search(message, skipped[0])


def test_a_fallback_is_announced_and_resumes_exactly_from_the_older_checkpoint(finished_run, tiny_bert, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    _damage(run / "checkpoint-4" / "rng_state_0.safetensors", "garbage", finished_run[0])
    resumed = train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5",
                            "--loss", "sogclr", "--resume_from", "latest"))  # fmt: skip
    assert "warning: skipped checkpoint-4: " in capsys.readouterr().out
    assert sorted(_losses(resumed)) == [3, 4, 5, 6]
    for step, loss in _losses(resumed).items():
        assert loss == pytest.approx(finished_run[1][step], abs=1e-6), step


def test_a_damaged_rng_state_is_an_error_unless_ignored_by_name(finished_run, tiny_bert, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    checkpoint = run / "checkpoint-4"
    (checkpoint / "rng_state_0.safetensors").unlink()
    argv = ["--max_steps", "6", "--loss", "sogclr", "--resume_from", str(checkpoint)]
    with pytest.raises(CheckpointError, match="rng_state_0.safetensors: missing"):
        train(_config(tiny_bert, tmp_path, *argv))
    resumed = train(_config(tiny_bert, tmp_path, *argv, "--ignore_rng_state"))
    assert sorted(_losses(resumed)) == [5, 6]
    assert "warning: --ignore_rng_state: the random draws differ" in capsys.readouterr().out


def test_nothing_intact_is_an_error_listing_every_checkpoint(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    for checkpoint in list_checkpoints(run):
        (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint(.|\n)*checkpoint-4(.|\n)*checkpoint-2"):
        find_checkpoint("latest", run, num_processes=1)


def test_a_checkpoint_of_two_processes_is_not_resumed_on_one_without_saying_so(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    checkpoint = run / "checkpoint-4"
    with pytest.raises(CheckpointError, match="written by 1 process\\(es\\), resumed on 2"):
        find_checkpoint(str(checkpoint), run, num_processes=2)
    assert find_checkpoint(str(checkpoint), run, num_processes=2, ignore_rng_state=True)[0] == checkpoint


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_nan_loss_stops_the_run_before_it_reaches_the_weights(tiny_bert, tmp_path, monkeypatch, accumulation):
    """The third loss call turns NaN: step 3, or with two micro-batches a step the first of step 2, whose second
    micro-batch is finite; the step's check (one read, before the optimizer step) stops the run either way."""
    import simcse_flat.trainer as trainer

    calls = []
    real = trainer.contrastive_loss_on_views

    def turns_nan_at_step_3(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    monkeypatch.setattr(trainer, "contrastive_loss_on_views", turns_nan_at_step_3)
    step, kept = (3, "checkpoint-2") if accumulation == 1 else (2, "checkpoint-1")
    with pytest.raises(TrainingDiverged, match=rf"loss became nan at step {step}.*{kept}"):
        train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--save_steps", str(step - 1),
                      "--gradient_accumulation_steps", str(accumulation)))  # fmt: skip
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == [kept] and not (run / "final").exists()
    from safetensors.torch import load_file

    weights = load_file(run / kept / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_failed_checkpoint_write_leaves_no_scratch_and_the_earlier_checkpoint_resumable(finished_run, tiny_bert, tmp_path, monkeypatch):
    import simcse_flat.checkpoint as checkpoint_module

    real, calls = checkpoint_module._save_main_files, []

    def disk_full_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(checkpoint_module, "_save_main_files", disk_full_on_the_second)
    argv = ["--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5", "--loss", "sogclr"]
    with pytest.raises(CheckpointError, match=r"writing checkpoint-4 failed \(No space left on device\); "
                                              r"the earlier checkpoint checkpoint-2 is intact"):  # fmt: skip
        train(_config(tiny_bert, tmp_path, *argv))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]  # no scratch left
    monkeypatch.setattr(checkpoint_module, "_save_main_files", real)
    resumed = train(_config(tiny_bert, tmp_path, *argv, "--resume_from", "latest"))
    for step, loss in _losses(resumed).items():
        assert loss == pytest.approx(finished_run[1][step], abs=1e-6), step


# ---- helpers ---------------------------------------------------------------------------------------------------------


def _payload(marker: Path) -> bytes:
    """A pickle that, if ever unpickled, creates ``marker``."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps(Exploit())


def _reseal(checkpoint: Path) -> None:
    from simcse_flat.checkpoint import MANIFEST_FILE, _describe

    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["files"] = {name: _describe(checkpoint / name) for name in manifest["files"]}
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


def _damage(file: Path, how: str, finished: Path) -> None:
    if how == "delete":
        file.unlink()
    elif how == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif how == "garbage":
        file.write_bytes(bytes(reversed(file.read_bytes())))  # same size, other bytes
    elif how == "swapped":  # another checkpoint's RNG file (another seed's would do as well): valid, and not this one's
        other = finished / "run" / "checkpoint-2" / file.name
        assert other.read_bytes() != file.read_bytes()
        shutil.copy(other, file)
    elif how == "extra_key":
        file.write_text(json.dumps({**json.loads(file.read_text()), "stage": 2}))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("limit, kept", [(1, ["checkpoint-6"]), (2, ["checkpoint-4", "checkpoint-6"])])
def test_save_total_limit_keeps_only_the_newest_checkpoints(tiny_bert, tmp_path, limit, kept):
    train(_config(tiny_bert, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", str(limit)))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == kept
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == kept  # removed, not just unlisted
