"""Gathering embeddings across processes, with gradient; and :func:`on_main`, one process's outcome on every process.

Every process scores its own anchors against the candidates of *all* processes (open_clip's ``local_loss``).
The gather must carry gradient back to the process that produced each candidate, otherwise each process would
only learn from its own slice and the result would depend on the number of processes.

Why the gradient comes out right: process ``r`` computes ``L_r``, the mean loss of its ``B`` anchors. The
backward of :class:`_AllGather` sums, over all processes, the gradient that reaches each slice, so the local
activations of ``r`` receive ``∂(Σ_r' L_r') / ∂z_r``. DDP then averages parameter gradients over the ``W``
processes: ``(1/W) ∂(Σ_r' L_r')/∂θ``, which is the gradient of the mean loss over all ``W·B`` anchors — exactly
the single-process gradient on the concatenated batch (``tests/test_distributed.py`` checks this with gloo).

Losses are told their rank and world size by their caller (``rank=``, ``world_size=``, as open_clip's ``ClipLoss``;
the trainer passes accelerate's ``process_index`` and ``num_processes``), not by :func:`rank` / :func:`world_size`
here, which serve the caller side (the vision model's batch norm, sentence-transformers' trainer). The gathers take
the world size their caller was built for and fail if the process group disagrees: a loss told the wrong world size
would otherwise read its rows at the wrong offsets without a sound.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import USER_ERRORS


def world_size() -> int:
    """Processes in the default group (1 without one); for callers, which pass it on to the losses they build."""
    return _group_size()


def rank() -> int:
    """This process's rank in the default group (0 without one); for callers, as :func:`world_size`."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """``all_gather`` whose backward sums the incoming gradients and returns this process's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.batch = tensor.size(0)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(tensor: Tensor, world_size: int) -> Tensor:
    """Concatenate ``tensor`` (``(B, ...)``, the same ``B`` on every process) from all processes, rank order.

    Differentiable; a no-op with one process. ``world_size``: how many processes the caller expects
    (:func:`check_gathered`).
    """
    gathered = tensor if _group_size() == 1 else _AllGather.apply(tensor)
    return check_gathered(gathered, tensor.size(0), world_size)


def gather_no_grad(tensor: Tensor, world_size: int) -> Tensor:
    """Concatenate ``tensor`` from all processes without gradient (sample ids, scores); ``world_size`` as above."""
    if _group_size() == 1:
        return check_gathered(tensor, tensor.size(0), world_size)
    parts = [torch.empty_like(tensor) for _ in range(_group_size())]
    dist.all_gather(parts, tensor.contiguous())
    return check_gathered(torch.cat(parts, dim=0), tensor.size(0), world_size)


def check_gathered(gathered: Tensor, local_rows: int, world_size: int) -> Tensor:
    """``gathered`` if it holds ``world_size * local_rows`` rows, else a ``ValueError`` naming both numbers.

    A size comparison, no communication: it catches a loss built for another number of processes at its first
    gather, before any offset computed from that number is used.
    """
    if gathered.size(0) != world_size * local_rows:
        raise ValueError(
            f"gathered {gathered.size(0)} rows, expected world_size * local rows = {world_size} * {local_rows} = "
            f"{world_size * local_rows}: the loss was built for world_size={world_size} but the process group has "
            f"{_group_size()} process(es); build it with the group's rank and world size "
            "(accelerate: process_index, num_processes)"
        )
    return gathered


# ---- one process's outcome on every process ----------------------------------------------------------------------


def on_main(accelerator, work: Callable[..., object], *args: object):
    """Run ``work(*args)`` on the main process and hand its result, or its error, to every process: a check that
    fails on the main process alone must stop all of them, not leave the others waiting for it at the next
    collective."""
    outcome: list = [None, None]
    error = None
    if accelerator.is_main_process:
        try:
            outcome[0] = work(*args)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            error = err
            outcome[1] = err if isinstance(err, USER_ERRORS) else RuntimeError(f"on the main process: {err!r}")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list  # pickles in memory, between our own processes

        broadcast_object_list(outcome)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
