"""Which examples make each batch: one source a batch, an order that is a function of ``(seed, epoch)`` only.

A run may train on several sources at once (``train_file: [wiki.txt, nli.csv]``). Each batch is drawn from one
source, so a batch has one number of views (2 for sentences, 3 for NLI triples) and no easy negatives from another
corpus; with ``W`` processes the ``W`` batches of one step (batch ``k`` goes to process ``k mod W``) come from the same
source too, since their candidates are gathered into one loss. How the sources take turns:

* ``proportional`` (default): every batch of every source once an epoch, in a shuffled order, so each source is seen
  in proportion to its size; ``weights`` scale that (2: its batches twice an epoch, each pass a new permutation; 0.5:
  half of them).
* ``round_robin``: one step from each source in turn; the epoch ends when the smallest source runs out (as
  sentence-transformers' ``ROUND_ROBIN``).

Every permutation is drawn from a generator seeded by ``(seed, epoch, source, pass)`` and nothing else, so a resumed
run that skips the batches already seen this epoch replays the same order: the data position of every source is the
number of batches into the epoch. With one source the order is exactly that of a shuffled ``DataLoader`` over a
permutation seeded by ``(seed, epoch)``.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLINGS = ("proportional", "round_robin")


class SourceBatchSampler:
    """Yields lists of sample ids (global across sources, see :class:`~simcse_flat.data.text.SourcesDataset`).

    Args:
        sizes: examples in each source, in ``train_file`` order.
        batch_size: examples per batch, per process.
        num_processes: ``W``; groups of ``W`` consecutive batches share a source.
        seed: the run's seed.
        sampling: ``proportional`` or ``round_robin``.
        weights: per source (``proportional`` only); ``None``: all 1.
    """

    drop_last = True  # every process and every step sees the same number of negatives

    def __init__(self, sizes: list[int], batch_size: int, num_processes: int, seed: int,
                 sampling: str = "proportional", weights: list[float] | None = None) -> None:  # fmt: skip
        if sampling not in SAMPLINGS:
            raise ValueError(f"dataset_sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if weights is not None and (len(weights) != len(sizes) or sampling != "proportional"):
            raise ValueError("weights need proportional sampling and one weight per source")
        self.sizes, self.batch_size, self.num_processes, self.seed = sizes, batch_size, num_processes, seed
        self.sampling, self.weights = sampling, weights or [1.0] * len(sizes)
        self.offsets = [sum(sizes[:s]) for s in range(len(sizes))]
        self.epoch = 0
        self.steps = self._steps_per_source()
        if not sum(self.steps):
            raise ValueError(f"no source has one step of {num_processes} x {batch_size} examples")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.steps) * self.num_processes

    def __iter__(self):
        streams = [self._batches(s) for s in range(len(self.sizes))]
        for source in self._schedule():
            for _ in range(self.num_processes):
                yield next(streams[source])

    def _steps_per_source(self) -> list[int]:
        full = [size // (self.batch_size * self.num_processes) for size in self.sizes]
        if self.sampling == "round_robin":
            return [min(full)] * len(full)
        return [round(w * f) for w, f in zip(self.weights, full)]

    def _schedule(self) -> list[int]:
        """The source of each step of this epoch."""
        if self.sampling == "round_robin":
            return [s for _ in range(self.steps[0]) for s in range(len(self.sizes))]
        order = [s for s, steps in enumerate(self.steps) for _ in range(steps)]
        if len(self.sizes) == 1:
            return order
        shuffle = torch.randperm(len(order), generator=self._generator(len(self.sizes), 0))
        return [order[i] for i in shuffle.tolist()]

    def _batches(self, source: int):
        """Batches of one source, pass after pass over fresh permutations (a weight above 1 needs more than one)."""
        offset, size = self.offsets[source], self.sizes[source]
        usable = size - size % self.batch_size  # drop_last, as a DataLoader over one permutation does
        for pass_ in range(1_000_000):
            # int32 (the same permutation as int64): half the memory of an epoch's order on a 10M-line corpus
            dtype = torch.int32 if size < 2**31 else torch.int64
            permutation = torch.randperm(size, generator=self._generator(source, pass_), dtype=dtype)
            for start in range(0, usable, self.batch_size):
                yield (permutation[start : start + self.batch_size] + offset).tolist()

    def _generator(self, stream: int, pass_: int) -> torch.Generator:
        if stream == 0 and pass_ == 0:  # the single-source order of earlier releases
            return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        words = f"{self.seed}/{self.epoch}/{stream}/{pass_}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(words, digest_size=7).digest(), "little"))
