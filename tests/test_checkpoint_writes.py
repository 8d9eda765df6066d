"""Writing and reading one checkpoint without a training run: what a killed write leaves, a scratch folder that cannot
be made, a seal that fails, an old checkpoint that cannot be removed, the exact message of each refusal, and two
processes of which one fails to write."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import simcse_flat.checkpoint as checkpoint_module
from simcse_flat.checkpoint import (
    CheckpointError,
    Trainables,
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)

from conftest import end_worker, free_loopback_port
from test_checkpoint_files import _raises_exactly

FIT_HINT = "was it written with another model_name_or_path, pooler or architecture?"
RNG_HINT = " (pass --ignore_rng_state to resume without it: not an exact resume)"


class _StatefulLoss(nn.Module):
    """A loss with per-sample state, as SogCLR's u and EMC²'s chains."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("u", torch.arange(4.0))


def _parts(layers: int = 1) -> Trainables:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()  # so that the optimizer has state to save
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainables(model, optimizer, scheduler, _StatefulLoss())


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _save(accelerator, output_dir: Path, step: int, keep_last: int = 5) -> Path:
    return save_checkpoint(accelerator, output_dir, TrainState(step=step), "seed: 1\n", keep_last, _parts())


# ---- writing ---------------------------------------------------------------------------------------------------------


def test_a_scratch_folder_left_by_a_killed_write_is_replaced(accelerator, tmp_path):
    scratch = tmp_path / "checkpoint-2.tmp"
    scratch.mkdir()
    (scratch / "model.safetensors").write_bytes(b"half written")
    (scratch / "left_over.bin").write_bytes(b"x")
    path = _save(accelerator, tmp_path, 2)
    assert not scratch.exists() and not (path / "left_over.bin").exists()
    assert validate_checkpoint(path, 1) == TrainState(step=2)


def test_a_scratch_folder_that_cannot_be_made_is_named_and_nothing_claimed(accelerator, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.write_text("a file where the run's folder should be")
    with _raises_exactly(f"writing checkpoint-2 failed ({output_dir / 'checkpoint-2.tmp'} Not a directory); "
                         "no earlier checkpoint exists"):  # fmt: skip
        _save(accelerator, output_dir, 2)


def test_a_failed_seal_leaves_no_scratch_and_prunes_nothing(accelerator, tmp_path, monkeypatch):
    for step in (2, 4):
        _save(accelerator, tmp_path, step, keep_last=2)

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "write_synced", disk_full)
    with _raises_exactly(f"writing checkpoint-6 failed ({tmp_path / 'checkpoint-6.tmp' / 'manifest.json'} No space "
                         "left on device); the earlier checkpoint checkpoint-4 is intact"):  # fmt: skip
        _save(accelerator, tmp_path, 6, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_an_old_checkpoint_that_cannot_be_removed_does_not_stop_the_run(accelerator, tmp_path, monkeypatch):
    """On NFS a file still open elsewhere leaves a ``.nfs…`` file behind and its folder cannot be removed: pruning is
    housekeeping, and must not fail the checkpoint that was just written."""
    _save(accelerator, tmp_path, 2)
    real_rmdir = os.rmdir

    def busy(path, *args, **kwargs):
        if str(path).endswith("checkpoint-2"):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", busy)
    path = _save(accelerator, tmp_path, 4, keep_last=1)
    assert list_checkpoints(tmp_path) == [path]  # checkpoint-2 emptied, its folder left, no longer a checkpoint
    assert validate_checkpoint(path, 1) == TrainState(step=4)


def test_only_folders_with_a_state_file_are_checkpoints(accelerator, tmp_path):
    path = _save(accelerator, tmp_path, 2)
    (tmp_path / "checkpoint-8").mkdir()  # an interrupted copy, say
    (tmp_path / "checkpoint-9.tmp").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "trainer_state.json").write_text("{}")
    assert list_checkpoints(tmp_path) == [path]


def _hf_trainer_checkpoint(folder: Path) -> Path:
    """A checkpoint folder as transformers' Trainer writes it: same name, a trainer_state.json of its own, no manifest."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    (folder / "optimizer.pt").write_bytes(b"a user's file")
    return folder


def test_pruning_removes_only_checkpoints_this_project_wrote(accelerator, tmp_path):
    """A run resumed from elsewhere into a folder holding another trainer's checkpoint-N keeps the limit on its own."""
    foreign = _hf_trainer_checkpoint(tmp_path / "checkpoint-1")
    for step in (2, 3, 4):
        path = _save(accelerator, tmp_path, step, keep_last=1)
    assert (foreign / "optimizer.pt").read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4"] and path.name == "checkpoint-4"


def test_a_checkpoint_of_the_same_step_not_written_here_is_refused_untouched(accelerator, tmp_path):
    foreign = _hf_trainer_checkpoint(tmp_path / "checkpoint-2")
    with _raises_exactly(f"writing checkpoint-2 failed ({foreign} not written by simcse_flat (no manifest.json): move "
                         "it away or choose another output_dir); no earlier checkpoint exists"):  # fmt: skip
        _save(accelerator, tmp_path, 2)
    assert (foreign / "optimizer.pt").read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no scratch left


# ---- checking --------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(accelerator, tmp_path) -> tuple[Path, Path]:
    return _save(accelerator, tmp_path, 2), _save(accelerator, tmp_path, 4)


def test_a_missing_file_is_named_with_the_rng_hint_only_for_rng_files(two_checkpoints):
    path = two_checkpoints[1]
    (path / "rng_state_0.json").unlink()
    with _raises_exactly(f"{path / 'rng_state_0.json'}: missing{RNG_HINT}"):
        validate_checkpoint(path, 1)  # the RNG state is checked unless told otherwise
    (path / "model.safetensors").unlink()
    with _raises_exactly(f"{path / 'model.safetensors'}: missing"):
        validate_checkpoint(path, 1)


def test_ignore_rng_state_skips_only_the_rng_files_and_reaches_latest(two_checkpoints, tmp_path):
    newest = two_checkpoints[1]
    (newest / "rng_state_0.safetensors").write_bytes(b"another run's")
    assert find_checkpoint("latest", tmp_path, 1, ignore_rng_state=True) == (newest, [])
    (newest / "scheduler.json").write_text("{}")  # after the RNG files in the manifest's order
    with pytest.raises(CheckpointError, match=re.escape(f"{newest / 'scheduler.json'}: 2 bytes")):
        validate_checkpoint(newest, 1, ignore_rng_state=True)


def test_nothing_intact_lists_each_checkpoint_on_its_own_line(two_checkpoints, tmp_path):
    sizes = [(p / "model.safetensors").stat().st_size for p in two_checkpoints]
    for path in two_checkpoints:
        (path / "model.safetensors").write_bytes(b"")
    lines = [f"skipped {path.name}: {path / 'model.safetensors'}: 0 bytes, {size} when written (truncated or replaced)"
             for path, size in zip(two_checkpoints, sizes)][::-1]  # fmt: skip
    with _raises_exactly("no intact checkpoint to resume from:\n  " + "\n  ".join(lines)):
        find_checkpoint("latest", tmp_path, 1)


def test_another_number_of_processes_is_refused_with_the_way_out(two_checkpoints):
    path = two_checkpoints[0]
    with _raises_exactly(f"{path}: written by 1 process(es), resumed on 2: their RNG states cannot be matched; pass "
                         "--ignore_rng_state to continue with fresh random draws (not an exact resume)"):  # fmt: skip
        validate_checkpoint(path, 2)


# ---- loading ---------------------------------------------------------------------------------------------------------


def test_loading_restores_the_random_draws_unless_told_not_to(accelerator, tmp_path):
    path = _save(accelerator, tmp_path, 2)
    after_save = torch.rand(3)
    parts = _parts()
    torch.manual_seed(123)
    load_checkpoint(accelerator, path, parts)
    torch.testing.assert_close(torch.rand(3), after_save, rtol=0, atol=0)
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(accelerator, path, parts, ignore_rng_state=True)
    torch.testing.assert_close(torch.rand(3), untouched, rtol=0, atol=0)


def test_weights_that_do_not_fit_the_model_are_refused_with_the_likely_cause(accelerator, tmp_path):
    path = _save(accelerator, tmp_path, 2)
    bigger = _parts(layers=2)  # strict: a missing layer is an error, not left at its random initialisation
    with _raises_exactly(f"{path / 'model.safetensors'}: does not fit this model (Error(s) in loading state_dict for "
                         f"Sequential:): {FIT_HINT}"):  # fmt: skip
        load_checkpoint(accelerator, path, bigger)


class _RecordedSharding:
    """What ``checkpoint.py`` asks of the sharding module under FSDP (:class:`simcse_flat.sharding.ShardedModel`),
    recorded: it hands over the full weights and optimizer state it gathers (``full``'s, not the local ones), and
    :meth:`load` runs the two loaders it is given on a plain copy of the model, as the main process does."""

    def __init__(self, full: Trainables) -> None:
        self.full, self.calls, self.loaded = full, [], None

    def gather(self, model, step):
        self.calls.append(("gather", model, step))
        return self.full.model

    def optimizer_state(self, model, optimizer):
        self.calls.append(("optimizer_state", model, optimizer))
        return self.full.optimizer.state_dict()

    def load(self, model, optimizer, load_weights, read_optimizer):
        self.calls.append(("load", model, optimizer))
        plain = copy.deepcopy(model)
        load_weights(plain)
        self.loaded = plain, read_optimizer()


def test_under_fsdp_the_checkpoint_holds_and_hands_back_what_the_sharding_module_gathers(accelerator, tmp_path):
    full = _parts()  # the gathered weights and moments: other than the process's own (a shard, under FSDP)
    full.model(torch.randn(5, 3)).sum().backward()
    full.optimizer.step()
    parts = _parts()
    parts.sharded = sharding = _RecordedSharding(full)
    path = save_checkpoint(accelerator, tmp_path, TrainState(step=2), "seed: 1\n", 5, parts)
    assert sharding.calls == [("gather", parts.model, 2), ("optimizer_state", parts.model, parts.optimizer)]
    target = _parts()
    target.sharded = sharding
    load_checkpoint(accelerator, path, target, ignore_rng_state=True)
    assert sharding.calls[-1] == ("load", target.model, target.optimizer)
    plain, optimizer_tree = sharding.loaded
    for name, tensor in full.model.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], tensor, rtol=0, atol=0)
    reread = torch.optim.AdamW(nn.Sequential(nn.Linear(3, 3)).parameters(), lr=0.1)
    reread.load_state_dict(optimizer_tree)
    expected = full.optimizer.state_dict()["state"]
    assert reread.state_dict()["state"].keys() == expected.keys()
    for index, moments in expected.items():
        for key, value in moments.items():
            torch.testing.assert_close(reread.state_dict()["state"][index][key], value, rtol=0, atol=0)
    # the sharding module loads the weights, not the plain path
    assert not torch.equal(target.model[0].weight, full.model[0].weight)


# ---- two processes ---------------------------------------------------------------------------------------------------


def _two_process_worker(rank: int, world: int, port: int, output_dir: str) -> None:
    """Save checkpoint-2 on both processes; then checkpoint-4, whose RNG file cannot be written on process 1."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip  (what accelerate launch sets)
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # a short timeout: a process that stops calling the collectives fails the test in seconds rather than hanging it
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=30))])
    main_files_written, real_main_files, real_save_tree = [], checkpoint_module._save_main_files, checkpoint_module.save_tree

    def counted_main_files(*args):
        main_files_written.append(rank)
        return real_main_files(*args)

    def disk_full_for_the_rng(state, stem):
        if rank == 1 and Path(stem).name.startswith("rng_state"):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(stem).with_suffix(".json")))
        return real_save_tree(state, stem)

    checkpoint_module._save_main_files = counted_main_files
    result = {"first": str(_save(accelerator, Path(output_dir), 2))}
    checkpoint_module.save_tree = disk_full_for_the_rng
    try:
        _save(accelerator, Path(output_dir), 4)
    except CheckpointError as error:
        result["second"] = str(error)
    result["main_files_written"] = main_files_written
    Path(output_dir, f"result.{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    end_worker()


def test_two_gloo_processes_write_one_checkpoint_and_both_stop_when_one_fails(tmp_path):
    mp.spawn(_two_process_worker, args=(2, free_loopback_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result.{rank}.json").read_text()) for rank in range(2)]
    first = tmp_path / "checkpoint-2"
    assert [r["first"] for r in results] == [str(first)] * 2
    assert [r["main_files_written"] for r in results] == [[0, 0], []]  # weights, optimizer: process 0, once a save
    assert validate_checkpoint(first, num_processes=2) == TrainState(step=2)  # both processes' RNG states in it
    kept = "the earlier checkpoint checkpoint-2 is intact"
    assert results[0]["second"] == f"writing checkpoint-4 failed (on another process); {kept}"
    own = tmp_path / "checkpoint-4.tmp" / "rng_state_1.json"
    assert results[1]["second"] == f"writing checkpoint-4 failed ({own} No space left on device); {kept}"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
