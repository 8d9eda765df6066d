"""From encoded views to the loss's inputs: anchors, gathered candidates, and where each anchor's positive is.

The encoder sees every view of a batch in one forward pass and returns ``(V*B, D)`` rows, view-major (see
:class:`simcse_flat.data.text.ContrastiveCollator`). View 0 holds the anchors; view 1 the positives; view 2, when
present, the hard negatives. Candidates are gathered from every process *with gradient* (the only place that does
so), and the indices are offset by this process's rank, as in open_clip's ``local_loss``.

The rank and world size are the loss's own (``loss_fn.rank``, ``loss_fn.world_size``, given to it by whoever built
it), not asked of the process group: the offsets here and the loss's (DCLW's own weights, EMC²'s slice of the
draws) then come from one source and cannot disagree, and the first gather of a step checks that source against
the process group (a loss built for another number of processes raises there).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .distributed import gather_no_grad, gather_with_grad
from .losses.base import ContrastiveLoss
from .samples import SampleRequest, hard_negative_ids


def split_views(embeddings: Tensor, batch_size: int) -> Tensor:
    """``(V*B, D)`` → ``(V, B, D)``."""
    if embeddings.size(0) % batch_size:
        raise ValueError(f"{embeddings.size(0)} rows are not a whole number of views of {batch_size} examples")
    return embeddings.view(-1, batch_size, embeddings.size(-1))


NEGATIVES = ("cross_view", "all_views")


def contrastive_loss_on_views(
    loss_fn: ContrastiveLoss,
    embeddings: Tensor,
    sample_ids: Tensor,
    symmetric: bool = False,
    encode_samples: Callable[[SampleRequest], Tensor] | None = None,
    negatives: str = "cross_view",
    sample_keys: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Score the anchors of this process against the candidates of all processes.

    ``negatives`` picks the candidates of two-view data:

    * ``cross_view`` (SimCSE, CLIP): view 0's anchors against every process's view 1; ``symmetric`` adds the
      mirrored direction (view 1 against view 0) and averages. ``B - 1`` negatives an anchor (world batch ``B``).
    * ``all_views`` (SimCLR's NT-Xent, FlatCLR, DCL's and EMC²'s code): every view is an anchor, scored against
      both views of every sample but itself, so ``2B - 2`` negatives; the mean over the ``2B`` anchors.
      ``symmetric`` is implied.

    3 views (SimCSE sup, ``cross_view`` only): candidates are all positives then all hard negatives; each
    anchor's own hard negative is marked so the loss can weight it.

    ``encode_samples``: embeds a :class:`~simcse_flat.samples.SampleRequest` with gradient, handed to the loss's one
    hook (:meth:`~simcse_flat.losses.base.ContrastiveLoss.inputs_for_step`; EMC² re-encodes its chain negatives).

    ``sample_keys``: each example's content key (:func:`~simcse_flat.data.text.content_key`), gathered like the ids:
    a candidate view of *another* sample with the anchor's key is a duplicate of the anchor and is masked out of
    every loss (a hard negative, another sentence, is never masked). ``None``: no masking.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    batch = sample_ids.size(0)
    views = split_views(embeddings, batch)  # (V, B, D)
    world = loss_fn.world_size
    gathered = [gather_with_grad(v, world) for v in views]  # each (W*B, D)
    all_ids = gather_no_grad(sample_ids, world)  # (W*B,)
    rows = loss_fn.own_rows(batch)
    own = torch.arange(rows.start, rows.stop, device=embeddings.device)  # my rows in a gathered view
    for_step = {} if encode_samples is None else loss_fn.inputs_for_step(encode_samples)
    duplicates = None
    if sample_keys is not None:
        duplicates = _duplicates(sample_ids, sample_keys, all_ids, gather_no_grad(sample_keys, world))

    def score(anchors: Tensor, candidates: Tensor, positive: Tensor, masked_blocks: int | None = None,
              **kwargs) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        if duplicates is not None:  # (B, W*B) over one view's columns, laid over the first masked_blocks views
            blocks = candidates.size(0) // duplicates.size(1)
            masked = blocks if masked_blocks is None else masked_blocks
            off = torch.zeros_like(duplicates)
            kwargs["duplicate_mask"] = torch.cat([duplicates] * masked + [off] * (blocks - masked), dim=1)
        return loss_fn(anchors, candidates, positive, anchor_ids=sample_ids, **kwargs, **for_step)

    if views.size(0) == 3:
        if negatives != "cross_view":
            raise ValueError("negatives: all_views takes two views a sample; supervised triples use cross_view")
        candidates = torch.cat(gathered[1:])  # (2*W*B, D): positives, then hard negatives
        hard_negative = own + world * batch
        hard_ids = hard_negative_ids(all_ids)  # a hard negative is another sentence of its sample (samples.py)
        return score(views[0], candidates, own, candidate_ids=torch.cat([all_ids, hard_ids]),
                     hard_negative_index=hard_negative, masked_blocks=1)  # fmt: skip
    if views.size(0) != 2:
        raise ValueError(f"expected 2 or 3 views, got {views.size(0)}")
    if negatives == "all_views":
        every_view, view_ids = torch.cat(gathered), all_ids.repeat(2)  # (2*W*B, D): view 0 of all, then view 1
        other = own + all_ids.numel()  # my rows in the gathered view 1
        return _mean_of(score(views[0], every_view, other, candidate_ids=view_ids, exclude_index=own),
                        score(views[1], every_view, own, candidate_ids=view_ids, exclude_index=other))  # fmt: skip
    forward = score(views[0], gathered[1], own, candidate_ids=all_ids)
    return _mean_of(forward, score(views[1], gathered[0], own, candidate_ids=all_ids)) if symmetric else forward


def _duplicates(ids: Tensor, keys: Tensor, all_ids: Tensor, all_keys: Tensor) -> Tensor:
    """``(B, W*B)`` bool: column ``j`` (a sample of any process) shares anchor ``i``'s key but is another sample."""
    return (all_keys[None, :] == keys[:, None]) & (all_ids[None, :] != ids[:, None])


def _mean_of(*results: tuple[Tensor, dict[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean loss and metrics of calls on equally many anchors (the mean over all their anchors)."""
    losses, metrics = zip(*results)
    return sum(losses) / len(losses), {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
