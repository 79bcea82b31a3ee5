"""``ScoredSubsetSampler``: a live sampler that draws only from the current selection."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from lightning_chips.selection import Selection, draw_weighted

__all__ = ["ScoredSubsetSampler"]


class ScoredSubsetSampler(DistributedSampler):
    """Draws a fixed number of pool indices per epoch ("virtual epoch" = one selection round) from the live
    selection.

    Every rank generates the same global sequence from a private generator seeded by
    ``(seed, round, epoch)`` and keeps every ``world_size``-th element starting at its rank, so ranks draw
    disjoint, equal-length shares whose union is the single-process sequence. Before any selection the whole
    pool is sampled. Top-k / stratified selections are drawn uniformly without replacement (reshuffled
    passes over the selection until the epoch is full); weighted selections with replacement by their
    weights. The selection is read at ``__iter__``, so a new one is seen at the next epoch, also with
    persistent dataloader workers (the sampler lives in the main process).

    It subclasses ``DistributedSampler`` only so that Lightning does not wrap it in another distributed
    sampler; rank and world size are set by :meth:`set_distributed` (the data module does it in ``setup``).

    Args:
        pool_size: number of items of the map-style pool.
        num_samples: items drawn per epoch on each rank (``steps x batch size x accumulation``).
        seed: seed of the draws.
        selection_fn: returns the current :class:`Selection` (or None before the first one).
        epoch_fn: returns the current epoch (defaults to the value given to :meth:`set_epoch`).
    """

    def __init__(
        self,
        pool_size: int,
        num_samples: int,
        *,
        seed: int = 0,
        selection_fn: Callable[[], Selection | None] | None = None,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        Sampler.__init__(self)
        if pool_size < 1:
            raise ValueError(f"The pool is empty (pool_size={pool_size}); there is nothing to sample.")
        if num_samples < 1:
            raise ValueError(f"`num_samples` per epoch must be >= 1, got {num_samples}.")
        self.pool_size = int(pool_size)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.selection_fn = selection_fn
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self.rank, self.num_replicas = 0, 1
        self.shuffle, self.drop_last = True, True  # DistributedSampler attributes some tools read
        self.total_size = self.num_samples

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Bind this sampler to one rank of ``world_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
        self.rank, self.num_replicas = int(rank), int(world_size)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def current_epoch(self) -> int:
        return int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch

    def global_sequence(self, selection: Selection | None = None, epoch: int | None = None) -> np.ndarray:
        """The ``num_samples x world_size`` indices all ranks draw this epoch (rank ``r`` takes ``[r::world]``)."""
        if selection is None and self.selection_fn is not None:
            selection = self.selection_fn()
        epoch = self.current_epoch() if epoch is None else epoch
        round_ = -1 if selection is None else selection.round
        generator = torch.Generator().manual_seed(_mix(self.seed, round_, epoch))
        total = self.total_size
        if selection is None:
            candidates = np.arange(self.pool_size, dtype=np.int64)
            weights = None
        else:
            candidates, weights = selection.indices, selection.weights
            if len(candidates) == 0:
                raise RuntimeError(f"Selection round {selection.round} is empty; nothing to sample.")
        if weights is not None:  # with replacement by weight, over any selection size
            return candidates[draw_weighted(weights, total, generator)]
        passes = -(-total // len(candidates))
        order = torch.cat([torch.randperm(len(candidates), generator=generator) for _ in range(passes)])[:total]
        return candidates[order.numpy()]

    def __iter__(self) -> Iterator[int]:
        sequence = self.global_sequence()
        return iter(sequence[self.rank :: self.num_replicas].tolist())


def _mix(seed: int, round_: int, epoch: int) -> int:
    """A 63-bit seed from (seed, round, epoch)."""
    value = (seed * 1_000_003 + (round_ + 1)) * 1_000_033 + epoch
    return value % (2**63 - 1)
