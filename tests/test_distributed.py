"""The cross-process gather: two gloo processes must produce the single-process loss and gradient of the whole batch.

Each process builds its loss with the rank and world size it is told (as the trainer does from accelerate), and a
loss told the wrong world size must refuse at its first gather rather than read the wrong rows.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from simcse_flat import distributed
from simcse_flat.grad_cache import GradCache
from simcse_flat.losses import build_loss
from simcse_flat.views import contrastive_loss_on_views

from conftest import end_worker, loopback_init_method

BATCH, DIM, VIEWS_OF = 4, 6, {"unsup": 2, "sup": 3}
LOSS_SETTINGS = {"dclw": ("dcl", {"weight_sigma": 0.5})}  # test name -> loss and its own settings


def _loss(name: str, **process):
    """``process``: ``rank`` and ``world_size``, as a caller passes them; none for one process."""
    loss, settings = LOSS_SETTINGS.get(name, (name, {}))
    return build_loss(loss, temperature=0.1, hard_negative_weight=0.5, **settings, **process)


class _Encoder(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # by keyword too, as the trainer calls encoders
        return super().forward(x)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return _Encoder(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 5))


def _inputs(world: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the whole ``world * BATCH`` batch, view-major like the collator: ``(views, world*B, DIM)``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(views, world * BATCH, DIM, generator=generator), torch.arange(world * BATCH)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _in_process_group(rank: int, world: int, init_method: str, work) -> None:
    """Run ``work()`` as process ``rank`` of a gloo group of ``world``, then end the process (``end_worker``)."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        work()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_worker()


def _my_rows(rank: int, world: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's slice of the whole batch: its examples, all views, view-major ``(V*B, DIM)``, and their ids."""
    inputs, ids = _inputs(world, VIEWS_OF[mode])
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    return inputs[:, mine].reshape(-1, DIM), ids[mine]


def _worker(rank: int, world: int, init_method: str, mode: str, loss_name: str, out: str, chunk: int,
            negatives: str) -> None:
    def work() -> None:
        model = nn.parallel.DistributedDataParallel(_encoder())
        rows, ids = _my_rows(rank, world, mode)
        loss_fn = _loss(loss_name, rank=rank, world_size=world)  # told by the caller, as the trainer does
        # GradCache: each chunk's backward but the last under DDP's no_sync (one reduction a step, same sum)
        cache = GradCache(model, chunk, model.no_sync) if chunk else None
        embeddings = cache.encode({"x": rows}) if cache else model(rows)
        loss, _ = contrastive_loss_on_views(loss_fn, embeddings, ids, negatives=negatives)
        loss.backward()
        if cache:
            cache.backward()
        torch.save({"loss": loss.detach(), "grads": _grads(model.module), "group": (distributed.rank(),
                    distributed.world_size())}, f"{out}.{rank}")  # fmt: skip

    _in_process_group(rank, world, init_method, work)


@pytest.mark.parametrize(
    "mode, loss_name, chunk, negatives",
    [("unsup", "infonce", 0, "cross_view"), ("unsup", "flatnce", 0, "cross_view"), ("sup", "infonce", 0, "cross_view"),
     ("sup", "flatnce", 0, "cross_view"), ("sup", "flatnce", 5, "cross_view"), ("unsup", "infonce", 0, "all_views"),
     ("unsup", "dclw", 0, "cross_view")],  # DCLW: each weight is relative to the mean over every process's positives
    ids=["unsup-infonce", "unsup-flatnce", "sup-infonce", "sup-flatnce", "sup-flatnce-gradcache", "nt-xent", "unsup-dclw"],
)
def test_two_gloo_processes_give_the_single_process_gradient(tmp_path, mode, loss_name, chunk, negatives):
    world = 2
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, loopback_init_method(), mode, loss_name, out, chunk, negatives), nprocs=world,
             join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(world)]
    assert [r["group"] for r in ranks] == [(0, world), (1, world)]  # what callers read and pass to their losses

    model = _encoder()
    inputs, ids = _inputs(world, VIEWS_OF[mode])
    loss_fn = _loss(loss_name)
    loss, _ = contrastive_loss_on_views(loss_fn, model(inputs.reshape(-1, DIM)), ids, negatives=negatives)
    loss.backward()
    # each process's loss is the mean over its own anchors: their mean is the mean over the whole batch
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / world, loss.detach(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(ranks[0]["grads"], _grads(model)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _untold_worker(rank: int, world: int, init_method: str, out: str) -> None:
    def work() -> None:
        rows, ids = _my_rows(rank, world, "unsup")
        try:  # built as for one process, run in two: the first gather must say so
            contrastive_loss_on_views(_loss("infonce"), _encoder()(rows), ids)
        except ValueError as error:
            Path(f"{out}.{rank}").write_text(str(error))

    _in_process_group(rank, world, init_method, work)


def test_a_loss_built_for_one_process_refuses_to_run_in_two(tmp_path):
    world, out = 2, str(tmp_path / "error")
    mp.spawn(_untold_worker, args=(world, loopback_init_method(), out), nprocs=world, join=True)
    for rank in range(world):
        message = Path(f"{out}.{rank}").read_text()  # absent: no error was raised
        assert f"gathered {world * BATCH} rows" in message and f"1 * {BATCH}" in message, message


def test_a_loss_told_more_processes_than_there_are_refuses():
    # DCLW gathers inside the loss: called directly, that gather is the first and checks the world size
    loss_fn = _loss("dclw", rank=1, world_size=2)
    anchors = torch.randn(BATCH, DIM)
    message = (f"gathered {BATCH} rows, expected world_size * local rows = 2 * {BATCH} = {2 * BATCH}: the loss was "
               "built for world_size=2 but the process group has 1 process(es); build it with the group's rank and "
               "world size (accelerate: process_index, num_processes)")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        loss_fn(anchors, torch.randn(BATCH, DIM), torch.arange(BATCH))
    with pytest.raises(ValueError, match="rank must be in"):
        _loss("infonce", rank=2, world_size=2)


def test_gather_is_identity_with_one_process():
    from simcse_flat.distributed import gather_no_grad, gather_with_grad

    x = torch.randn(3, 2)
    assert gather_with_grad(x, world_size=1) is x and gather_no_grad(x, world_size=1) is x
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert _loss("infonce").own_rows(3) == slice(0, 3)
    assert not dist.is_initialized() or os.environ.get("WORLD_SIZE") == "1"


def _on_main_worker(rank: int, world: int, port: int, out: str) -> None:
    # accelerate's own state over gloo (as accelerate launch sets it up), for on_main's broadcast
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")  # fmt: skip
    from accelerate import Accelerator

    from simcse_flat.errors import CheckpointError

    accelerator = Accelerator(cpu=True)
    outcomes = {"result": distributed.on_main(accelerator, lambda: f"read by process {accelerator.process_index}")}

    def fails(error: Exception):
        def work():
            raise error

        return work

    for name, error in [("user", CheckpointError("checkpoint-3/model.safetensors: truncated")),
                        ("bug", KeyError("state"))]:  # fmt: skip
        try:
            distributed.on_main(accelerator, fails(error))
        except Exception as raised:  # noqa: BLE001 - what each process sees is the test's subject
            outcomes[name] = f"{type(raised).__name__}: {raised}"
    Path(f"{out}.{rank}").write_text(json.dumps(outcomes))
    accelerator.wait_for_everyone()
    end_worker()


def test_the_main_processs_result_or_error_reaches_every_process(tmp_path):
    from conftest import free_loopback_port

    world, out = 2, str(tmp_path / "outcome")
    mp.spawn(_on_main_worker, args=(world, free_loopback_port(), out), nprocs=world, join=True)
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]
    assert seen[0]["result"] == seen[1]["result"] == "read by process 0"  # the work ran on the main process only
    # a user's error is the same error everywhere (one line from the CLI); anything else names its origin elsewhere
    assert seen[0]["user"] == seen[1]["user"] == "CheckpointError: checkpoint-3/model.safetensors: truncated"
    assert seen[0]["bug"] == "KeyError: 'state'"
    assert seen[1]["bug"] == "RuntimeError: on the main process: KeyError('state')"
