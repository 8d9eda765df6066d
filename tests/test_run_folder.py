"""What the project may write and delete: exports never replace a folder we did not write, the run folder is
checked before anything loads, one job at a time holds it, and nothing of the training machine travels with a model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from simcse_flat.cli import run_cli
from simcse_flat.run_folder import RunFolderError, RunLock, check_destination, write_folder_atomically
from simcse_flat.trainer import train

from conftest import load_script
from test_trainer import _config


@pytest.fixture(scope="module")
def trained_run(tiny_bert, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    train(_config(tiny_bert, root, "--max_steps", "2", "--save_steps", "2"))
    return root / "run"


def _export(monkeypatch, *argv: str) -> int:
    """``python scripts/export_model.py ARGV`` in this process; its exit code."""
    monkeypatch.setattr(sys, "argv", ["export_model.py", *argv])
    return run_cli(load_script("export_model").main)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_a_folder_holding_someone_elses_files(trained_run, tmp_path, monkeypatch, capsys):
    destination = tmp_path / "x"
    destination.mkdir()
    (destination / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces an earlier export of ours, never a stranger's files
        assert _export(monkeypatch, str(trained_run / "final"), str(destination), *extra) == 2
        assert "holds files simcse_flat did not write (thesis.tex)" in capsys.readouterr().err
        assert _tree(destination) == {"thesis.tex": b"precious"}


def test_export_into_its_own_run_folder_or_the_current_folder_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _tree(run)
    assert _export(monkeypatch, str(run / "checkpoint-2"), str(run)) == 2
    assert "did not write" in capsys.readouterr().err and _tree(run) == before
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    assert _export(monkeypatch, str(run / "final"), ".") == 2
    assert "the current folder" in capsys.readouterr().err and _tree(here) == {"notes.txt": b"mine"}


def test_an_earlier_export_is_replaced_only_when_asked(trained_run, tmp_path, monkeypatch, capsys):
    destination = tmp_path / "model"
    assert _export(monkeypatch, str(trained_run / "final"), str(destination)) == 0
    written = json.loads((destination / "simcse_flat.json").read_text())["files"]
    assert "model.safetensors" in written and "README.md" in written and "training_config.yaml" in written
    assert _export(monkeypatch, str(trained_run / "final"), str(destination)) == 2
    assert "holds an earlier export; pass --overwrite" in capsys.readouterr().err
    assert _export(monkeypatch, str(trained_run / "final"), str(destination), "--overwrite") == 0
    (destination / "my_notes.md").write_text("added by hand")  # now it holds something of the user's: refused
    assert _export(monkeypatch, str(trained_run / "final"), str(destination), "--overwrite") == 2
    assert (destination / "my_notes.md").read_text() == "added by hand"


def test_a_failed_export_leaves_the_destination_as_it_was(tmp_path):
    destination = tmp_path / "model"
    with write_folder_atomically(destination) as folder:
        (folder / "weights").write_text("first")
    with pytest.raises(RuntimeError), write_folder_atomically(destination, overwrite=True) as folder:
        (folder / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (destination / "weights").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no scratch left beside it


@pytest.mark.parametrize("case", ["file", "under_a_file", "symlink_loop", "unwritable", "disk_full"])
def test_output_folder_problems_are_reported_before_the_model_loads(tiny_bert, tmp_path, monkeypatch, case):
    import simcse_flat.run_folder as run_folder

    from simcse_flat.modalities.text import TextModality

    def must_not_load(self, config, evaluate=True):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(TextModality, "build", must_not_load)
    output = tmp_path / "out"
    messages = {"file": "is a file", "under_a_file": "lies under", "symlink_loop": "leads nowhere",
                "unwritable": "cannot write there", "disk_full": "0 MiB free, a checkpoint needs about"}  # fmt: skip
    if case == "file":
        output.write_text("a file")
    elif case == "under_a_file":
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "out"
    elif case == "symlink_loop":
        output.symlink_to(output)
    elif case == "unwritable":  # root ignores permission bits, so the refusal the OS would give is simulated

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(run_folder.tempfile, "NamedTemporaryFile", refuse)
    elif case == "disk_full":
        monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    config = _config(tiny_bert, tmp_path)
    config.training.output_dir = str(output)
    with pytest.raises(RunFolderError, match=messages[case]):
        train(config)


def test_a_second_job_on_the_same_folder_is_refused_while_the_first_holds_it(tiny_bert, tmp_path):
    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run").acquire()  # as a running job holds it
    try:
        with pytest.raises(RunFolderError, match=r"in use by a running job \(pid \d+"):
            train(_config(tiny_bert, tmp_path, "--max_steps", "2", "--resume_from", "latest"))
    finally:
        lock.release()
    assert train(_config(tiny_bert, tmp_path, "--max_steps", "2", "--resume_from", "latest")).state.step == 2


def test_a_run_leaves_no_lock_file_and_a_failed_start_no_folder(tiny_bert, tmp_path):
    from simcse_flat.data.text import DataError

    config = _config(tiny_bert, tmp_path, "--per_device_train_batch_size", "64")  # 40 sentences: not one batch
    with pytest.raises(DataError, match="fewer than one batch"):
        train(config)
    assert not (tmp_path / "run").exists()  # the folder it created, empty: gone
    (tmp_path / "run").mkdir()
    with pytest.raises(DataError):
        train(config)
    assert list((tmp_path / "run").iterdir()) == []  # the user's folder is kept, without our lock file
    train(_config(tiny_bert, tmp_path, "--max_steps", "1"))
    assert not (tmp_path / "run" / ".simcse_flat.lock").exists() and (tmp_path / "run" / "final").is_dir()


def test_a_released_lock_file_is_not_locked_again_by_a_waiting_job(tmp_path):
    first = RunLock(tmp_path).acquire()
    first.release()
    second, third = RunLock(tmp_path).acquire(), RunLock(tmp_path)
    with pytest.raises(RunFolderError, match="in use"):  # the new file is the one locked
        third.acquire()
    second.release()
    third.acquire().release()


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_rerun(tiny_bert, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("logging_steps: 0\n")  # what a run failing at step 1 left
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 0, "eval/x": 1}\n')
    (tmp_path / "run" / ".simcse_flat_run.json").write_text('{"files": ["config.yaml", "log.jsonl"]}\n')
    assert train(_config(tiny_bert, tmp_path, "--max_steps", "2")).state.step == 2


def test_overwrite_output_dir_deletes_only_what_simcse_flat_wrote(trained_run, tiny_bert, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert json.loads((run / ".simcse_flat_run.json").read_text()) == {"files": ["config.yaml", "log.jsonl"]}
    hf = run / "checkpoint-500"  # a transformers Trainer's checkpoint: no manifest.json of ours
    hf.mkdir()
    (hf / "trainer_state.json").write_text('{"global_step": 500}')
    (hf / "model.safetensors").write_bytes(b"weights of a week")
    (run / "logs" / "hf_run").mkdir(parents=True)  # not claimed: this run logged to no tracker
    (run / "logs" / "hf_run" / "events.out").write_bytes(b"curves")
    (run / "final" / "my_notes.md").write_text("mine")  # final/ now holds a file its export did not list
    for what, clear in (("checkpoint-500 (no manifest.json of simcse_flat)", hf), ("logs (not listed in", run / "logs"),
                        ("final (files not listed in its simcse_flat.json)", run / "final" / "my_notes.md")):  # fmt: skip
        before = _tree(run)
        for flags in (["--overwrite_output_dir"], []):  # refused either way, in one line, before anything is deleted
            with pytest.raises(RunFolderError, match=r"nothing was deleted") as refusal:
                train(_config(tiny_bert, tmp_path, "--max_steps", "2", *flags))
            assert what in str(refusal.value) and "\n" not in str(refusal.value)
            assert _tree(run) == before
        shutil.rmtree(clear) if clear.is_dir() else clear.unlink()  # the user moves it away
    again = train(_config(tiny_bert, tmp_path, "--max_steps", "1", "--save_steps", "0", "--overwrite_output_dir"))
    assert again.state.step == 1 and sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1"]  # fmt: skip


def test_a_resumed_run_clears_what_a_kill_left_mid_export(trained_run, tiny_bert, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for scratch in (".final.tmp-k1l2/folder", "final.tmp-old1/folder"):  # ours now, and an earlier release's
        (run / scratch).mkdir(parents=True)
        (run / scratch / "model.safetensors").write_bytes(b"half")
    (run / ".log.jsonl.tmp-99").write_text("half a log")
    (run / "notes.tmp-1").mkdir()  # not a name we write: left alone
    train(_config(tiny_bert, tmp_path, "--max_steps", "2", "--resume_from", "latest"))
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == ["notes.tmp-1"]


def test_exported_folders_carry_no_path_of_the_training_machine(trained_run, tmp_path):
    for folder in ("final",):
        for name in ("training_config.yaml", "README.md", "simcse_flat.json"):
            text = (trained_run / folder / name).read_text()
            assert str(trained_run.parent) not in text and "/tmp" not in text, (folder, name)
    import yaml

    config = yaml.safe_load((trained_run / "final" / "training_config.yaml").read_text())
    portable = (config["output_dir"], config["train_file"], config["resume_from_checkpoint"])
    assert portable == ("runs/run", ["train.txt"], None)


def test_check_destination_allows_new_and_empty_folders(tmp_path):
    check_destination(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty")
    with pytest.raises(RunFolderError, match="is not a folder"):
        (tmp_path / "f").write_text("x")
        check_destination(tmp_path / "f")


def test_a_text_runs_saved_settings_are_the_text_modalitys_and_the_shared_ones(trained_run):
    """``config.yaml`` (the run's, a checkpoint's, ``final/``'s ``training_config.yaml``) names the modality and
    holds its settings, not another modality's (a text run once saved ``arch: resnet18``)."""
    import dataclasses

    import yaml

    from simcse_flat.modalities import TextArguments, VisionArguments

    text = {f.name for f in dataclasses.fields(TextArguments)}
    vision = {f.name for f in dataclasses.fields(VisionArguments)}
    for path in (trained_run / "config.yaml", trained_run / "checkpoint-2" / "config.yaml",
                 trained_run / "final" / "training_config.yaml"):  # fmt: skip
        saved = yaml.safe_load(path.read_text())
        assert saved["modality"] == "text" and text <= set(saved), path
        assert not vision & set(saved), path
