"""The cross-process gather: two gloo processes must produce the single-process gradient of the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from simcse_flat.grad_cache import GradCache
from simcse_flat.losses import build_loss
from simcse_flat.views import contrastive_loss_on_views

from conftest import end_worker, loopback_init_method

BATCH, DIM, VIEWS_OF = 4, 6, {"unsup": 2, "sup": 3}
LOSS_SETTINGS = {"dclw": ("dcl", {"weight_sigma": 0.5})}  # test name -> loss and its own settings


def _loss(name: str):
    loss, settings = LOSS_SETTINGS.get(name, (name, {}))
    return build_loss(loss, temperature=0.1, hard_negative_weight=0.5, **settings)


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


def _worker(rank: int, world: int, init_method: str, mode: str, loss_name: str, out: str, chunk: int,
            negatives: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_encoder())
        inputs, ids = _inputs(world, VIEWS_OF[mode])
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        rows = inputs[:, mine].reshape(-1, DIM)  # this process's examples, all views, view-major
        loss_fn = _loss(loss_name)
        # GradCache: each chunk's backward but the last under DDP's no_sync (one reduction a step, same sum)
        cache = GradCache(model, chunk, model.no_sync) if chunk else None
        embeddings = cache.encode({"x": rows}) if cache else model(rows)
        loss, _ = contrastive_loss_on_views(loss_fn, embeddings, ids[mine], negatives=negatives)
        loss.backward()
        if cache:
            cache.backward()
        if rank == 0:
            torch.save(_grads(model.module), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_worker()


@pytest.mark.parametrize(
    "mode, loss_name, chunk, negatives",
    [("unsup", "infonce", 0, "cross_view"), ("unsup", "flatnce", 0, "cross_view"), ("sup", "infonce", 0, "cross_view"),
     ("sup", "flatnce", 0, "cross_view"), ("sup", "flatnce", 5, "cross_view"), ("unsup", "infonce", 0, "all_views"),
     ("unsup", "dclw", 0, "cross_view")],  # DCLW: each weight is relative to the mean over every process's positives
    ids=["unsup-infonce", "unsup-flatnce", "sup-infonce", "sup-flatnce", "sup-flatnce-gradcache", "nt-xent", "unsup-dclw"],
)
def test_two_gloo_processes_give_the_single_process_gradient(tmp_path, mode, loss_name, chunk, negatives):
    world = 2
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(world, loopback_init_method(), mode, loss_name, out, chunk, negatives), nprocs=world,
             join=True)
    two_process = torch.load(out)

    model = _encoder()
    inputs, ids = _inputs(world, VIEWS_OF[mode])
    loss_fn = _loss(loss_name)
    loss, _ = contrastive_loss_on_views(loss_fn, model(inputs.reshape(-1, DIM)), ids, negatives=negatives)
    loss.backward()
    for got, expected in zip(two_process, _grads(model)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gather_is_identity_with_one_process():
    from simcse_flat.distributed import gather_with_grad, rank_offset

    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert rank_offset(3) == 0
    assert not dist.is_initialized() or os.environ.get("WORLD_SIZE") == "1"
