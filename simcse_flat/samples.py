"""Which sample, and which of its views: the one place that writes and reads a sample's view as an integer.

A candidate a loss scores is a view of a data-set sample: view 1 (the positive) of sample ``j``, or with supervised
triples view 2 (its hard negative, a sentence of its own). Two integer codes name them, each made and read here:

* a *candidate id* (:mod:`simcse_flat.views` hands them to the losses): ``j`` for the positive, ``-1 - j`` for the
  hard negative, so that no hard negative carries a sample's id (a loss leaves out the columns of its anchor's id);
* an EMC² *chain state* (the chains' buffer, saved in checkpoints): ``j`` for the positive, ``m + j`` for the hard
  negative of ``m`` samples, so that ``-1`` can mean "an empty chain".

What is encoded outside the batch is asked for as a :class:`SampleRequest` (ids and views), decoded from chain states
by :meth:`SampleRequest.of_states`; the modality's ``encode_samples`` reads the request, never a code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POSITIVE, HARD_NEGATIVE = 1, 2  # the views of the collated layout (view 0: the anchors) a request asks for


@dataclass(frozen=True)
class SampleRequest:
    """Samples to encode with gradient, each as one of its views: what a loss asks of the loop outside the batch."""

    ids: Tensor  # (n,) data-set index of each sample
    view: Tensor  # (n,) POSITIVE or HARD_NEGATIVE

    @classmethod
    def of_states(cls, states: Tensor, dataset_size: int) -> SampleRequest:
        """The samples and views EMC² chain ``states`` stand for: ``j``, ``j``'s positive; ``m + j``, its hard
        negative."""
        hard = states >= dataset_size
        return cls(states % dataset_size, torch.where(hard, HARD_NEGATIVE, POSITIVE))


def hard_negative_ids(ids: Tensor) -> Tensor:
    """The candidate id of each sample's hard negative."""
    return -1 - ids


def chain_states(candidate_ids: Tensor, dataset_size: int) -> Tensor:
    """The chain state of each candidate id (a positive keeps its id; sample ``j``'s hard negative is ``m + j``)."""
    return torch.where(candidate_ids >= 0, candidate_ids, dataset_size - 1 - candidate_ids)
