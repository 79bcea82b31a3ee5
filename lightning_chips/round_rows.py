"""The rows of a selection round: features or scores of pool pairs with where they are in the pool (dataset
index, or shard and position), their ids as given and their ``group_by`` keys; how a batch of pool items becomes
rows, how the ranks' rows are gathered, and which row of a repeated id is kept (its first, in pool order). Internal
to :mod:`lightning_chips.engine` and :mod:`lightning_chips.offline`, which decide these things the same way through
it (docs/selection.md, "One round").
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_chips.adapters import CLIPAdapter
from lightning_chips.collective import Collective
from lightning_chips.data.checks import SkippedSample
from lightning_chips.data.pool import PoolItem
from lightning_chips.features import PairFeatures, iter_features
from lightning_chips.groups import GroupEncoder
from lightning_chips.ids import Id, id_keys

__all__ = ["DUPLICATE_REASON", "Rows", "extract_rows", "first_occurrences", "gather_rows", "iter_rows", "uids_of"]

DUPLICATE_REASON = "duplicate id: an earlier pair of the pool has this id (that one is scored, this one skipped)"
"""The reason of a pool pair skipped because an earlier pair (in pool order) has the same id."""


@dataclass
class Rows:
    """Pairs read in a pass: their features (or None once scored), scores, pool positions and order keys."""

    ids: Tensor
    index: Tensor  # dataset index (map-style pools) or the id (shard pools)
    order: Tensor  # pool order: the dataset index, or a shard pool's order key, or the read order
    labels: Tensor | None
    features: PairFeatures | None = None
    scores: Tensor | None = None
    uids: list[Id] | None = None  # the ids as given, when they are strings (``ids`` holds their keys)
    groups: Tensor | None = None  # [n, F] keys of the ``group_by`` values (:class:`GroupEncoder`)

    def take(self, rows: Tensor) -> Rows:
        return Rows(
            self.ids[rows], self.index[rows], self.order[rows], None if self.labels is None else self.labels[rows],
            None if self.features is None else self.features.index(rows),
            None if self.scores is None else self.scores[rows],
            None if self.uids is None else [self.uids[i] for i in rows.tolist()],
            None if self.groups is None else self.groups[rows],
        )  # fmt: skip

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        features = [p.features for p in parts]
        uids = None if all(p.uids is None for p in parts) else [u for p in parts for u in uids_of(p)]
        return Rows(
            torch.cat([p.ids for p in parts]), torch.cat([p.index for p in parts]), torch.cat([p.order for p in parts]),
            join("labels"), None if any(f is None for f in features) else PairFeatures.cat(features),  # type: ignore[arg-type]
            join("scores"), uids, join("groups"),
        )  # fmt: skip

    def keep_first(self, positional: bool = False) -> tuple[Rows, list[SkippedSample]]:
        """The rows in pool order with each id once (its first row); the other rows as skipped samples (with their
        dataset index when ``positional``)."""
        rows = self.take(torch.argsort(self.order, stable=True))
        ids = rows.ids.numpy()
        keep = np.zeros(len(ids), dtype=bool)
        keep[first_occurrences(ids)] = True
        given = uids_of(rows)
        duplicates = [
            SkippedSample(DUPLICATE_REASON, id=given[i], index=int(rows.index[i]) if positional else None)
            for i in np.flatnonzero(~keep)
        ]  # fmt: skip
        return rows.take(torch.from_numpy(np.flatnonzero(keep))), duplicates


def first_occurrences(ids: np.ndarray) -> np.ndarray:
    """The position of each id's first occurrence in ``ids`` (given in pool order), in id order: the one pair of a
    repeated id that a round scores, in every entry point (the later ones are skipped as duplicates)."""
    return np.unique(ids, return_index=True)[1]


def uids_of(rows: Rows) -> list[Id]:
    """The ids of ``rows`` as given (int ids are their keys)."""
    return rows.uids if rows.uids is not None else rows.ids.tolist()


def gather_rows(collective: Collective, mine: Rows | None, *, features: bool) -> Rows:
    """Every rank's rows (a rank without any sends none), in rank order."""
    shapes = collective.objects(None if mine is None else (
        mine.labels is not None,
        None if mine.features is None else (mine.features.image.shape[1], mine.features.text.shape[1]),
        0 if mine.groups is None else mine.groups.shape[1],
    ))  # fmt: skip
    present = [s for s in shapes if s is not None]
    if not present:
        empty = torch.zeros(0, dtype=torch.int64)
        return Rows(empty, empty, empty, None, None, torch.zeros(0))
    with_labels = all(s[0] for s in present)
    if mine is None:
        empty = torch.zeros(0, dtype=torch.int64)
        dims = present[0][1]
        mine = Rows(empty, empty, empty, empty if with_labels else None,
                     PairFeatures(empty, torch.zeros(0, dims[0]), torch.zeros(0, dims[1]), None) if dims else None,
                     torch.zeros(0))  # fmt: skip
    labels = collective.cat(mine.labels) if with_labels and mine.labels is not None else None
    gathered_features = None
    if features and mine.features is not None:
        f = mine.features
        gathered_features = PairFeatures(collective.cat(f.ids), collective.cat(f.image), collective.cat(f.text),
                                          labels)  # fmt: skip
    uids = collective.objects(mine.uids)
    gathered_uids = None
    if any(u is not None for u in uids):  # string ids somewhere: every rank's ids as given, in rank order
        gathered_uids = [u for part, n in zip(uids, collective.objects(len(mine.ids)), strict=True)
                         for u in (part if part is not None else [None] * n)]  # fmt: skip
    rows = Rows(collective.cat(mine.ids), collective.cat(mine.index), collective.cat(mine.order), labels,
                 gathered_features, None if mine.scores is None else collective.cat(mine.scores))  # fmt: skip
    if mine.groups is not None or any(s[2] for s in present):
        width = next(s[2] for s in present if s[2])
        own_groups = mine.groups if mine.groups is not None else torch.zeros(0, width, dtype=torch.int64)
        rows.groups = collective.cat(own_groups)
    if gathered_uids is not None:
        rows.uids = [k if u is None else u for u, k in zip(gathered_uids, rows.ids.tolist(), strict=True)]
    return rows


def iter_rows(
    adapter: CLIPAdapter,
    items: Iterable[PoolItem],
    sink: list[SkippedSample],
    *,
    device: torch.device | str,
    progress: bool,
    description: str,
    precision: Callable[[], contextlib.AbstractContextManager],
    groups: GroupEncoder | None = None,
) -> Iterator[Rows]:
    """The features of each batch of ``items`` with its pool positions (and ``groups`` keys); skipped samples go to
    ``sink``."""
    pending: deque[tuple[Tensor, Tensor, list[Id] | None, Tensor | None]] = deque()
    read = 0
    traced = any(s.traceback for s in sink)

    def batches() -> Iterator[dict[str, Any]]:
        nonlocal read, traced
        for batch, skipped in items:
            for s in skipped:  # the first loading error's traceback is kept (for the max_skipped error), no other
                if s.traceback and traced:
                    s = dataclasses.replace(s, traceback="")
                traced = traced or bool(s.traceback)
                sink.append(s)
            if batch is None or len(batch["id"]) == 0:
                continue
            uids = list(batch["id"]) if isinstance(batch["id"], list | tuple) else None  # string ids
            if uids is not None:
                batch["id"] = torch.from_numpy(id_keys(uids))
            ids = torch.as_tensor(batch["id"], dtype=torch.int64)
            if "index" in batch:
                index = torch.as_tensor(batch.pop("index"), dtype=torch.int64)
                order = index
            elif "order" in batch:
                index, order = ids, torch.as_tensor(batch.pop("order"), dtype=torch.int64)
            else:
                index, order = ids, torch.arange(read, read + len(ids), dtype=torch.int64)
            read += len(ids)
            pending.append((index, order, uids, None if groups is None else groups(batch, len(ids))))
            yield batch

    try:
        total: int | None = len(items)  # type: ignore[arg-type]
    except TypeError:  # a stream of unknown length
        total = None
    with precision():
        for features in iter_features(adapter, batches(), device=device, progress=progress, description=description,
                                      total=total):  # fmt: skip
            index, order, uids, keys = pending.popleft()
            labels = None if features.labels is None else features.labels.cpu()
            yield Rows(features.ids.cpu(), index, order, labels, features, uids=uids, groups=keys)


def extract_rows(adapter: CLIPAdapter, items: Iterable[PoolItem], sink: list[SkippedSample],
             **kwargs: Any) -> Rows | None:  # fmt: skip
    parts = [rows for rows in iter_rows(adapter, items, sink, **kwargs)]
    for rows in parts:
        rows.features = rows.features.to("cpu")  # type: ignore[union-attr]
    return Rows.cat(parts) if parts else None
