"""The contract between a pool and a selection round: :class:`SelectablePool`, and its two implementations.

A round (:func:`lightning_chips.engine.run_round`, used by :class:`~lightning_chips.DataSelectionCallback` and
``lightning-chips score``) reads a pool through three streams of ``(batch, skipped)`` items:

* :meth:`SelectablePool.target_batches`: this rank's share of the target set;
* :meth:`SelectablePool.pool_sample_batches`: this rank's part of the round's pool sample (the pairs
  ``Scorer.prepare`` sees; the round gathers the parts of every rank);
* :meth:`SelectablePool.scoring_batches`: this rank's share of the pool, to score.

``batch`` is a collated dict ``{"image", "text" (token ids), "id"[, "label"]}`` plus where its pairs are in the
pool (``"index"``: dataset indices of a map-style pool; ``"order"``: for a shard pool, the shard's place in the
shard list times 2**40 plus the pair's place in the shard: among its valid pairs when scoring, among all its
samples in the pool sample, which keeps the same order), or ``None`` when an item only carries skipped
samples. Pool order decides which pair of a repeated id is kept (the first). ``skipped`` lists the
:class:`~lightning_chips.data.checks.SkippedSample` s found since the previous item, the one record of a pair that
could not be used (and of a shard that could not be read to the end). How a pool finds them (a
:class:`~lightning_chips.data.checks.CheckedPairs` view of map-style data, the
:class:`~lightning_chips.data.webdataset.ShardReport` of each shard) stays inside it.

:class:`MapPool` serves map-style datasets (:class:`~lightning_chips.data.ScoredSubsetDataModule`);
:class:`ShardPool` serves WebDataset shards (:class:`~lightning_chips.data.WebDatasetDataModule` and
``lightning-chips score``). A data module of one's own is selectable when it has ``selection`` and ``target``
attributes and these methods (``isinstance(dm, SelectablePool)`` checks it); :class:`PoolMethods` gives a data
module these methods from a :class:`MapPool` or :class:`ShardPool` it builds.

Galleries (``gallery=K``) read the pairs they show through :meth:`PairSource.load_pairs`, which :class:`MapPool`,
:class:`ShardPool` and the data modules have; a pool of one's own gets galleries when it has it too (without it, its
rounds run and its gallery pairs are listed as missing, docs/selection.md "One round").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_chips.data.checks import CheckedPairs, ShardReport, SkippedSample
from lightning_chips.data.collate import PairCollate, ShardCollate
from lightning_chips.data.webdataset import SAMPLE_PER_SHARD, WebDatasetPairs, find_pairs
from lightning_chips.ids import Id
from lightning_chips.selection import Selection

__all__ = [
    "MapBatches",
    "MapPool",
    "IndexedPool",
    "PairSource",
    "PoolItem",
    "PoolMethods",
    "SelectablePool",
    "ShardBatches",
    "ShardPool",
    "shard_indices",
]

PoolItem = tuple[dict[str, Any] | None, list[SkippedSample]]
"""One item of a pool's scoring streams: a collated batch (or None) and the samples skipped since the last item."""

LoadedPairs = Mapping[Id, tuple[Any, Any] | str]
"""What :meth:`PairSource.load_pairs` returns: id -> ``(image, caption)``, or the reason the pair could not be read."""


SHARD_STRIDE = 1 << 40
"""A shard pool's order key of a pair: ``shard * SHARD_STRIDE + position in the shard``."""


class _ShardOrder:
    """Adds ``batch["order"]`` (see :data:`SHARD_STRIDE`) from ``batch["shard"]``, counting positions per shard
    over every batch it sees (so it must see every batch of the shards it counts)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        order = []
        for s in torch.as_tensor(batch.pop("shard")).tolist():
            order.append(s * SHARD_STRIDE + self.counts.get(s, 0))
            self.counts[s] = self.counts.get(s, 0) + 1
        batch["order"] = torch.tensor(order, dtype=torch.int64)
        return batch


def shard_indices(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Contiguous share ``rank`` of ``world`` of ``indices`` (sizes differ by at most one)."""
    return np.array_split(np.asarray(indices, dtype=np.int64), world)[rank]


@runtime_checkable
class SelectablePool(Protocol):
    """What a selection round needs from a data module (see the module docstring for the batch contract). A stream
    with a ``__len__`` (its number of items) gets a progress bar with a total and an ETA.

    Attributes:
        selection: the :class:`~lightning_chips.selection.Selection` in force (None before the first round); the
            round sets it, and the training loader draws from it.
        target: the target set, or None.
    """

    selection: Selection | None
    target: Dataset | None

    def pool_size(self) -> int | None:
        """The number of pool pairs when it is known without reading the pool (map-style), else None."""
        ...

    def target_batches(self, target: Dataset | None, rank: int, world: int) -> Iterable[PoolItem]:
        """This rank's share of ``target`` (default: the pool's own target set)."""
        ...

    def pool_sample_batches(self, size: int | None, round: int, seed: int, rank: int,
                            world: int) -> Iterable[PoolItem]:  # fmt: skip
        """This rank's part of a sample of ``size`` pool pairs drawn with ``(seed, round)`` (None: every pair); the
        parts of all ranks make the same sample whatever the number of ranks."""
        ...

    def scoring_batches(self, rank: int, world: int) -> Iterable[PoolItem]:
        """This rank's share of the whole pool, each pair once, its skipped samples alongside."""
        ...


@runtime_checkable
class PairSource(Protocol):
    """A pool that gives pairs back by id: what a round's galleries (``gallery=K``) read."""

    def load_pairs(self, ids: Sequence[Id], order: Sequence[int] | None = None) -> LoadedPairs:
        """``id -> (image, caption)`` of ``ids`` (the image as the pool holds it: PIL, uint8 or float in [0, 1];
        the caption a string), or ``id -> reason`` for a pair that could not be read; an id left out is missing.
        ``order``: the pairs' pool positions as the round recorded them
        (:attr:`~lightning_chips.engine.RoundScores.order`), or None."""
        ...


@runtime_checkable
class IndexedPool(Protocol):
    """A map-style pool that streams any set of its pairs by dataset index: what a candidate round
    (:mod:`lightning_chips.rescore`) reads. :class:`MapPool` and :class:`~lightning_chips.data.ScoredSubsetDataModule`
    have it; a shard pool does not (a pair is reached by reading its shard)."""

    def indexed_batches(self, indices: np.ndarray, rank: int, world: int) -> Iterable[PoolItem]:
        """This rank's contiguous share of the pairs at ``indices`` (sorted dataset indices), in index order, its
        skipped samples alongside (as :meth:`SelectablePool.scoring_batches`)."""
        ...


class PoolMethods:
    """The :class:`SelectablePool` streams and :meth:`PairSource.load_pairs` of a data module, served by the
    :class:`MapPool` or :class:`ShardPool` its :meth:`scoring_pool` builds (the module keeps ``selection``,
    ``target`` and ``pool_size``)."""

    def scoring_pool(self) -> MapPool | ShardPool:
        """The pool that serves this module's selection rounds."""
        raise NotImplementedError

    def target_batches(self, target: Dataset | None, rank: int, world: int) -> Iterable[PoolItem]:
        """This rank's share of the target set (or the given one), bad pairs alongside."""
        return self.scoring_pool().target_batches(target, rank, world)

    def pool_sample_batches(self, size: int | None, round: int, seed: int, rank: int,
                            world: int) -> Iterable[PoolItem]:  # fmt: skip
        """This rank's part of a pool sample of ``size`` pairs drawn with ``(seed, round)`` (see the pool's
        ``pool_sample_batches``)."""
        return self.scoring_pool().pool_sample_batches(size, round, seed, rank, world)

    def scoring_batches(self, rank: int, world: int) -> Iterable[PoolItem]:
        """This rank's share of the pool, unshuffled, its skipped samples (and unreadable shards) alongside."""
        return self.scoring_pool().scoring_batches(rank, world)

    def load_pairs(self, ids: Sequence[Id], order: Sequence[int] | None = None) -> LoadedPairs:
        """The pairs of ``ids``, for galleries (:meth:`PairSource.load_pairs`)."""
        return self.scoring_pool().load_pairs(ids, order)


class _Indexed(Dataset):
    """``indices`` of a :class:`CheckedPairs` view, each valid item with its dataset ``"index"``."""

    def __init__(self, checked: CheckedPairs, indices: np.ndarray) -> None:
        self.checked, self.indices = checked, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any] | SkippedSample:
        index = int(self.indices[position])
        item = self.checked[index]
        return item if isinstance(item, SkippedSample) else {**item, "index": index}


class MapBatches:
    """``(batch, skipped)`` items of ``indices`` of a checked map-style dataset, in index order; its length is the
    number of batches (progress bars show a total and an ETA)."""

    def __init__(self, checked: CheckedPairs, indices: np.ndarray, collate: PairCollate, batch_size: int,
                 num_workers: int = 0) -> None:  # fmt: skip
        self.loader = DataLoader(_Indexed(checked, indices), batch_size=batch_size, shuffle=False,
                                 collate_fn=collate, num_workers=num_workers)  # fmt: skip

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[PoolItem]:
        for batch in self.loader:
            skipped = list(batch.pop("bad", ()))
            yield (batch if len(batch["id"]) else None), skipped


class MapPool:
    """:class:`SelectablePool` streams of a map-style pool (and target): contiguous shares per rank, bad pairs
    found by :class:`~lightning_chips.data.checks.CheckedPairs`, and a pool sample of indices drawn with
    ``numpy.random.default_rng([seed, round])``.

    Args:
        pool: the map-style pool.
        target: the target set (None: the caller passes one to :meth:`target_batches`).
        collate: the :class:`~lightning_chips.data.PairCollate` that tokenizes and normalises.
        batch_size: pairs per batch.
        num_workers: dataloader workers.
        checked: the :class:`CheckedPairs` view of a dataset (a data module passes its cached one).
    """

    def __init__(self, pool: Dataset, target: Dataset | None, collate: PairCollate, batch_size: int,
                 num_workers: int = 0, checked: Callable[[Dataset], CheckedPairs] = CheckedPairs) -> None:  # fmt: skip
        self.pool, self.target, self.collate = pool, target, collate
        self.batch_size, self.num_workers, self.checked = batch_size, num_workers, checked

    def pool_size(self) -> int:
        return len(self.pool)  # type: ignore[arg-type]

    def _batches(self, dataset: Dataset, indices: np.ndarray) -> MapBatches:
        return MapBatches(self.checked(dataset), indices, self.collate, self.batch_size, self.num_workers)

    def target_batches(self, target: Dataset | None, rank: int, world: int) -> MapBatches:
        target = _require_target(target, self.target)
        return self._batches(target, shard_indices(np.arange(len(target)), rank, world))  # type: ignore[arg-type]

    def pool_sample_batches(self, size: int | None, round: int, seed: int, rank: int,
                            world: int) -> MapBatches:  # fmt: skip
        n = self.pool_size()
        if size is None or size >= n:
            chosen = np.arange(n)
        else:
            chosen = np.sort(np.random.default_rng([seed, round]).choice(n, size=size, replace=False))
        return self._batches(self.pool, shard_indices(chosen, rank, world))

    def scoring_batches(self, rank: int, world: int) -> MapBatches:
        return self._batches(self.pool, shard_indices(np.arange(self.pool_size()), rank, world))

    def indexed_batches(self, indices: np.ndarray, rank: int, world: int) -> MapBatches:
        """This rank's share of the pairs at ``indices`` (:class:`IndexedPool`)."""
        return self._batches(self.pool, shard_indices(np.sort(np.asarray(indices, dtype=np.int64)), rank, world))

    def load_pairs(self, ids: Sequence[Id], order: Sequence[int] | None = None) -> LoadedPairs:
        """The pairs by dataset index (``order``); a pair that fails to load gives the reason."""
        if order is None:
            return dict.fromkeys(ids, "no dataset index (a map-style pool reads its pairs back by index)")
        loaded: dict[Id, tuple[Any, Any] | str] = {}
        for uid, index in zip(ids, order, strict=True):
            try:
                item = self.pool[int(index)]
                loaded[uid] = (item["image"], item.get("text"))
            except Exception as exc:  # a pair that loaded for scoring may still fail here: reported
                loaded[uid] = f"failed to load: {type(exc).__name__}: {exc}"
        return loaded


class ShardBatches:
    """A shard pool's scoring items, with an (estimated) length in batches when the sample counts are known."""

    def __init__(self, items: Iterator[PoolItem], batches: int | None) -> None:
        self.items, self.batches = items, batches

    def __iter__(self) -> Iterator[PoolItem]:
        return self.items

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("the number of batches of this shard pool is unknown")
        return self.batches


class ShardPool:
    """:class:`SelectablePool` streams of a WebDataset pool: rank ``r`` scores ``shards[r::world]``, its skipped
    samples and unreadable shards from each shard's :class:`~lightning_chips.data.webdataset.ShardReport`. The
    pool sample of ``size`` pairs is spread over ``k = min(#shards, max(16, ceil(size / sample_per_shard)))``
    shards drawn with ``(seed, round)``: a uniform sample of about ``size / k`` valid pairs of each (a shard that
    holds fewer leaves the rest to another shard drawn behind it), each shard read by one rank, the drawn shards
    dealt to the ranks (:meth:`~lightning_chips.data.webdataset.WebDatasetPairs.sample_plan`, docs/offline.md
    "The pool sample").

    Args:
        pairs: the pool's :class:`~lightning_chips.data.webdataset.WebDatasetPairs`.
        target: the (map-style) target set, read through :class:`~lightning_chips.data.checks.CheckedPairs`.
        collate: the :class:`~lightning_chips.data.PairCollate` that tokenizes and normalises.
        batch_size: pairs per batch.
        num_workers: dataloader workers of the scoring pass (at most one per shard of the rank).
        worker_start_method: ``"spawn"`` / ``"forkserver"`` / ``"fork"`` workers (default: the platform's).
        skip: shards not to score (``lightning-chips score`` resuming); the pool sample still reads them.
        sample_per_shard: about the most pairs the pool sample takes from one shard (while the pool has enough
            shards): lower spreads the sample over more shards (closer to a uniform draw on a pool written in source
            order) and reads more of them.
    """

    def __init__(
        self,
        pairs: WebDatasetPairs,
        target: Dataset | None,
        collate: PairCollate,
        batch_size: int,
        num_workers: int = 0,
        worker_start_method: str | None = None,
        skip: Sequence[str] = (),
        sample_per_shard: int = SAMPLE_PER_SHARD,
    ) -> None:
        if isinstance(sample_per_shard, bool) or not isinstance(sample_per_shard, int) or sample_per_shard < 1:
            raise ValueError(f"`sample_per_shard` must be an int >= 1, got {sample_per_shard!r}.")
        self.sample_per_shard = sample_per_shard
        self.pairs, self.target, self.collate = pairs, target, collate
        self.batch_size, self.num_workers, self.worker_start_method = batch_size, num_workers, worker_start_method
        self.skip = tuple(skip)
        self._checked: dict[int, CheckedPairs] = {}

    def pool_size(self) -> None:
        return None

    def target_batches(self, target: Dataset | None, rank: int, world: int) -> MapBatches:
        target = _require_target(target, self.target)
        checked = self._checked.setdefault(id(target), CheckedPairs(target))
        share = shard_indices(np.arange(len(checked)), rank, world)
        return MapBatches(checked, share, self.collate, self.batch_size)

    def pool_sample_batches(self, size: int | None, round: int, seed: int, rank: int,
                            world: int) -> Iterator[PoolItem]:  # fmt: skip
        """This rank's part of the pool sample (see the class docstring): the slots ``rank, rank + world, ...`` of
        the sample's plan, so no shard is read by two ranks; bad samples are left out, unreported (the scoring pass
        reports them)."""
        for batch in self.pairs.sample_batches(size, [seed, round], self.batch_size, self.collate, rank=rank,
                                               world=world, per_shard=self.sample_per_shard):  # fmt: skip
            shard = torch.as_tensor(batch.pop("shard"), dtype=torch.int64)
            batch["order"] = shard * SHARD_STRIDE + torch.as_tensor(batch.pop("position"), dtype=torch.int64)
            yield batch, []

    def scoring_loader(self, rank: int, world: int) -> DataLoader:
        """The DataLoader of this rank's shards: batches with ``"shard"`` (index of each pair's shard in
        ``pairs.urls``) and ``"reports"`` (the :class:`ShardReport` of each shard that ended in the batch)."""
        reporting = copy.copy(self.pairs)
        reporting.reports, reporting.skip = True, frozenset(self.skip)
        reporting.bind(rank, world)
        workers = min(self.num_workers, len(reporting.shards_of_rank()))
        return DataLoader(reporting, batch_size=self.batch_size, num_workers=workers,
                          collate_fn=ShardCollate(self.collate.tokenizer, self.collate.image),
                          multiprocessing_context=self.worker_start_method if workers > 0 else None)  # fmt: skip

    def scoring_batches(self, rank: int, world: int) -> ShardBatches:
        """This rank's shards as ``(batch, skipped)`` items; sized (a progress bar total, in batches) when the
        shards' sample counts are known (img2dataset's ``NAME_stats.json``)."""
        reading = copy.copy(self.pairs).bind(rank, world)
        known = reading.known_samples([u for u in reading.shards_of_rank() if u not in self.skip])
        return ShardBatches(self._scoring_items(rank, world), None if known is None else -(-known // self.batch_size))

    def load_pairs(self, ids: Sequence[Id], order: Sequence[int] | None = None) -> LoadedPairs:
        """The pairs by uid (:func:`~lightning_chips.data.webdataset.find_pairs`), read from the shards that hold
        them when their pool positions (``order``) are known, else from every shard up to the last one needed."""
        urls = self.pairs.urls
        if order is not None:  # the shards that hold the pairs, in pool order
            urls = [urls[int(s)] for s in np.unique(np.asarray(order, dtype=np.int64) // SHARD_STRIDE)]
        found, missing = find_pairs(urls, ids, uid_field=self.pairs.uid_field)
        return {**missing, **found}

    def _scoring_items(self, rank: int, world: int) -> Iterator[PoolItem]:
        scored, read, order = 0, 0, _ShardOrder()  # a shard is read by one worker of one rank, in order
        for batch in self.scoring_loader(rank, world):
            reports: list[ShardReport] = batch.pop("reports")
            read += sum(report.samples for report in reports)
            scored += len(batch["id"])
            skipped = [s for report in reports for s in report.skipped()]
            yield (order(batch) if len(batch["id"]) else None), skipped
        if read != scored:
            raise RuntimeError(
                f"Rank {rank} read {scored} pool pairs but its shard reports count {read}: a shard's pairs were "
                "lost between the reader and the collate."
            )


def _require_target(target: Dataset | None, default: Dataset | None) -> Dataset:
    target = target if target is not None else default
    if target is None:
        raise ValueError("No target set: pass `target` to the data module or to DataSelectionCallback.")
    return target
