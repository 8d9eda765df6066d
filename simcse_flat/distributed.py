"""Gathering embeddings across processes, with gradient: the only module that knows about ranks.

Every process scores its own anchors against the candidates of *all* processes (open_clip's ``local_loss``).
The gather must carry gradient back to the process that produced each candidate, otherwise each process would
only learn from its own slice and the result would depend on the number of processes.

Why the gradient comes out right: process ``r`` computes ``L_r``, the mean loss of its ``B`` anchors. The
backward of :class:`_AllGather` sums, over all processes, the gradient that reaches each slice, so the local
activations of ``r`` receive ``∂(Σ_r' L_r') / ∂z_r``. DDP then averages parameter gradients over the ``W``
processes: ``(1/W) ∂(Σ_r' L_r')/∂θ``, which is the gradient of the mean loss over all ``W·B`` anchors — exactly
the single-process gradient on the concatenated batch (``tests/test_distributed.py`` checks this with gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (``(B, ...)``, the same ``B`` on every process) from all processes, rank order.

    Differentiable; a no-op with one process.
    """
    if world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all processes without gradient (sample ids, scores)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def rank_offset(local_batch: int) -> int:
    """Index of this process's first row in a gathered tensor: targets are ``rank_offset(B) + arange(B)``."""
    return rank() * local_batch
