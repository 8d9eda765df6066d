"""GradCache: a contrastive batch larger than the activations memory holds, with the same gradient.

A contrastive loss couples every row of the batch, so the batch cannot simply be split into micro-batches
(gradient accumulation enlarges the gradient's batch, not the negatives). GradCache (Gao, Zhang, Han, Callan,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021, arXiv 2101.06983) splits
the *encoder* instead, because the loss only sees embeddings:

1. encode the batch chunk by chunk **without** autograd, keeping only the ``(n, D)`` embeddings;
2. compute the loss on the embeddings (detached leaves) and backpropagate it to them: ``g = ∂loss / ∂e``;
3. encode each chunk again **with** autograd and backpropagate ``g``'s rows: ``∂loss/∂θ = Σ_chunks (∂e/∂θ)ᵀ g``.

Peak activation memory is one chunk's, at the price of a second forward pass. Step 3 must see the same dropout
masks as step 1 (SimCSE's only noise is dropout), so each chunk replays the RNG state it was first encoded with.
sentence-transformers' ``CachedMultipleNegativesRankingLoss`` does the same inside one loss; here it wraps the
encoder, so every loss (and EMC²'s chain negatives) gets it.

The gradient equals the one of encoding the chunks one after the other with autograd on (the dropout masks are
drawn chunk by chunk, so not the masks of one forward pass over the whole batch: same distribution, other draws).
Normalisation that mixes rows (batch norm) sees chunk statistics and would update its running statistics twice:
the configuration refuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn


class RngState:
    """The CPU and (on CUDA) device RNG states at one moment, to replay a forward pass with the same dropout."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the RNG is left as it was before the block."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else [], device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class GradCache:
    """Encode in chunks without activations (:meth:`encode`); after ``loss.backward()``, :meth:`backward` re-encodes
    the chunks with autograd and sends the embeddings' gradients into the encoder.

    Args:
        encoder: called as ``encoder(**chunk)``, returning one row per input row.
        chunk_size: rows (every view counts) encoded at once.
        no_sync: context manager that suspends the cross-process gradient reduction (``accelerator.no_sync``);
            every chunk's backward but the last runs inside it, so processes reduce once a step rather than once a
            chunk (averaging is linear: the gradient is the same either way, the traffic is not).
    """

    def __init__(
        self,
        encoder: nn.Module,
        chunk_size: int,
        no_sync: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.encoder, self.chunk_size, self.no_sync = encoder, chunk_size, no_sync
        self._pending: list[tuple[dict[str, Tensor], RngState, Tensor]] = []

    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        """``(n, D)`` embeddings of ``batch``'s rows, concatenated from one detached leaf per chunk; the gradient
        that reaches those leaves is what :meth:`backward` carries into the encoder. May be called several times
        before :meth:`backward` (EMC²'s chain negatives are encoded through it too)."""
        embeddings = []
        for chunk in split_rows(batch, self.chunk_size):
            state = RngState(next(iter(chunk.values())).device)
            with torch.no_grad():
                leaf = self.encoder(**chunk).detach().requires_grad_()
            self._pending.append((chunk, state, leaf))
            embeddings.append(leaf)
        return torch.cat(embeddings)

    def backward(self) -> None:
        """Re-encode every chunk since the last call with autograd and backpropagate its cached gradient."""
        pending = [(chunk, state, leaf.grad) for chunk, state, leaf in self._pending if leaf.grad is not None]
        self._pending.clear()
        for position, (chunk, state, grad) in enumerate(pending):
            last = position == len(pending) - 1
            with state.replay(), nullcontext() if last else self.no_sync():
                self.encoder(**chunk).backward(grad)


def split_rows(batch: dict[str, Tensor], chunk_size: int) -> list[dict[str, Tensor]]:
    """``batch`` cut along its first dimension into chunks of at most ``chunk_size`` rows."""
    sizes = {value.size(0) for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"every input of a batch needs the same number of rows, got {sorted(sizes)}")
    starts = range(0, sizes.pop(), chunk_size)
    return [{key: value[start : start + chunk_size] for key, value in batch.items()} for start in starts]
