"""The checkpoint's small files, read without a training run: each bad file gets one line naming it and what is wrong,
and a resumed run is told which settings differ from the checkpoint's."""

from __future__ import annotations

import json
import re

import pytest

from simcse_flat.checkpoint import CheckpointError, TrainState, changed_settings, validate_checkpoint

STATE = {"step": 3, "epoch": 1, "batch_in_epoch": 2, "best_metric": None, "best_step": None}


def _raises_exactly(message: str):
    return pytest.raises(CheckpointError, match=f"^{re.escape(message)}$")


def test_train_state_round_trips_and_bad_states_are_named(tmp_path):
    file = tmp_path / "trainer_state.json"
    file.write_text(TrainState(**STATE).to_json())
    assert TrainState.read(file) == TrainState(**STATE)
    keys = sorted(STATE)
    cases = [
        ([1, 2], f"{file}: expected the keys {keys}, got list"),
        ({"step": 3}, f"{file}: expected the keys {keys}, got ['step']"),
        ({**STATE, "step": -1}, f"{file}: step, epoch and batch_in_epoch must be whole numbers >= 0"),
        ({**STATE, "epoch": 1.5}, f"{file}: step, epoch and batch_in_epoch must be whole numbers >= 0"),
    ]
    for values, message in cases:
        file.write_text(json.dumps(values))
        with _raises_exactly(message):
            TrainState.read(file)


def _checkpoint(tmp_path, manifest=None, config="seed: 1\n"):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(TrainState(**STATE).to_json())
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    (folder / "config.yaml").write_text(config)
    return folder


def test_a_folder_without_state_or_with_a_bad_manifest_is_named(tmp_path):
    with _raises_exactly(f"{tmp_path}: not a checkpoint (no trainer_state.json)"):
        validate_checkpoint(tmp_path, 1)
    folder = _checkpoint(tmp_path, manifest={"files": [], "num_processes": 1})
    with _raises_exactly(f"{folder / 'manifest.json'}: not a valid manifest (wrong layout)"):
        validate_checkpoint(folder, 1)
    (folder / "manifest.json").write_text(json.dumps({"files": {}, "num_processes": 1}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / 'manifest.json'))}: does not list "
                                              r"config\.yaml, loss_state\.json, .*rng_state_0\.json"):  # fmt: skip
        validate_checkpoint(folder, 1)


def test_a_bad_config_yaml_is_named(tmp_path):
    from simcse_flat.checkpoint import saved_config

    folder = _checkpoint(tmp_path, config="- a list\n- of things\n")
    with _raises_exactly(f"{folder / 'config.yaml'}: expected a mapping of settings"):
        saved_config(folder)
    (folder / "config.yaml").write_text("key: [unclosed\n")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / 'config.yaml'))}: not readable yaml \("):
        saved_config(folder)


def test_changed_settings_lists_each_difference_but_not_how_to_resume(tmp_path):
    saved = {"learning_rate": 0.001, "seed": 1, "resume_from_checkpoint": None, "overwrite_output_dir": False,
             "ignore_rng_state": False, "resume_from": None}  # fmt: skip
    folder = _checkpoint(tmp_path, config=json.dumps(saved))  # JSON is yaml
    now = {**saved, "learning_rate": 0.002, "resume_from_checkpoint": "latest", "overwrite_output_dir": True,
           "ignore_rng_state": True, "resume_from": "latest", "new_key": 5}  # fmt: skip
    assert changed_settings(folder, now) == ["learning_rate: 0.001 -> 0.002", "new_key: None -> 5"]
    assert changed_settings(folder, saved) == []
