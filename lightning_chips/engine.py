"""One selection round, written once: :class:`~lightning_chips.DataSelectionCallback` runs :func:`run_round`, and
``lightning-chips score`` (:mod:`lightning_chips.offline`) runs :func:`prepare_round` and then :func:`score_batch`
per batch of its predict pass, so a round behaves the same through every entry point (docs/selection.md,
"One round").

A round reads its pool through :class:`~lightning_chips.data.pool.SelectablePool` (``(batch, skipped)`` streams)
and talks to the other ranks through a :class:`Collective` (single process: no communication):

1. the target features (this rank's share, gathered) and the pool sample features (this rank's part, gathered;
   duplicate ids kept once);
2. :func:`prepare_scorer`: ``scorer.prepare`` on both in id order, on the scoring device, outside inference mode
   and with autograd on (some scorers train in ``prepare``);
3. this rank's share of the pool, extracted and scored (:func:`score_batch`: float32, autocast off; NaN or inf is a
   ``FloatingPointError`` naming the scorer, the round and the first ids);
4. ids, scores, labels and pool positions gathered in pool order (dataset index; for shards, shard then position),
   duplicate ids kept at their first position and the others skipped, every skipped sample gathered; with
   ``max_skipped``, a round that skipped more than that share of the pool's pairs is a :class:`TooManySkippedError`
   on every rank.

Feature extraction runs inside ``precision`` (the trainer's precision plugin's forward context), scoring in
float32. Before every gather the ranks :meth:`Collective.agree` that their part succeeded, so an error on one rank
is an error on all, not a hang. Work that is not part of the round (logging, galleries, reports) runs through
:meth:`Collective.optional`: its failure is a warning on every rank, never an exception or a hang.

One module (over 500 lines) because it is one thing: the steps of a round and the rank bookkeeping they need
(rows with their pool positions, gathers, duplicates, skipped samples), which only a round uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import Tensor
from torch.utils.data import Dataset

from lightning_chips.adapters import CLIPAdapter
from lightning_chips.data.checks import SkippedSample, describe_error, format_traceback
from lightning_chips.data.pool import PoolItem, SelectablePool
from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures, iter_features
from lightning_chips.groups import GroupColumn, GroupEncoder
from lightning_chips.ids import Id, id_keys, ids_array
from lightning_chips.scoring import RoundContext, Scorer

__all__ = [
    "DUPLICATE_REASON",
    "NO_ID",
    "Collective",
    "RoundScores",
    "TooManySkippedError",
    "check_max_skipped",
    "check_skipped",
    "name_skipped",
    "prepare_round",
    "prepare_scorer",
    "run_round",
    "score_batch",
    "skipped_arrays",
]

_T = TypeVar("_T")

NO_ID: int = int(np.iinfo(np.int64).min)
"""``bad_ids`` entry of a round file for a skipped pair that has no usable id."""

DUPLICATE_REASON = "duplicate id: an earlier pair of the pool has this id (that one is scored, this one skipped)"
"""The reason of a pool pair skipped because an earlier pair (in pool order) has the same id."""


class TooManySkippedError(RuntimeError):
    """A round skipped more of the pool's pairs (failed to load or the checks) than ``max_skipped`` allows: a
    loading bug or broken data that would bias the selection (see :func:`check_skipped`)."""


# --------------------------------------------------------------------------------------------------------------
# the ranks of a round
# --------------------------------------------------------------------------------------------------------------
class Collective:
    """How the ranks of a round agree and gather; without a trainer (or with one rank) nothing is communicated.

    Args:
        trainer: the Trainer whose strategy joins the ranks (``fit`` or ``predict``), or None for one process.
    """

    def __init__(self, trainer: Trainer | None = None) -> None:
        self.trainer = trainer if trainer is not None and trainer.world_size > 1 else None
        self.rank = 0 if trainer is None else trainer.global_rank
        self.world = 1 if trainer is None else trainer.world_size

    def agree(self, round_: int, what: str, fn: Callable[[], _T]) -> _T:
        """Run this rank's part of a round, then agree with every rank that all parts succeeded (before the next
        gather, so no rank waits for one that has failed). The failing rank re-raises its own error; the others
        raise a ``RuntimeError`` naming the failed ranks and their errors."""
        error: Exception | None = None
        result: Any = None
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks know
            error = exc
        if self.trainer is not None:
            strategy = self.trainer.strategy
            flag = torch.tensor([int(error is not None)], device=strategy.root_device)
            failed = torch.nonzero(strategy.all_gather(flag).reshape(-1)).reshape(-1).tolist()
            messages = self.objects(None if error is None else describe_error(error)) if failed else []
            if failed and error is None:
                detail = "; ".join(f"rank {i}: {messages[i]}" for i in failed)
                raise RuntimeError(
                    f"Selection round {round_} stopped on rank {self.rank}: rank(s) {failed} failed while computing "
                    f"{what} ({detail}); see that rank's traceback."
                )
        if error is not None:
            raise error
        return result

    def optional(self, what: str, fn: Callable[[], object], *, rank: int | None = 0) -> list[str]:
        """Run ``fn`` on ``rank`` (every rank when None): work outside a round's agreement (logging, galleries, a
        report) that must never end the fit. An exception in it is caught, then every rank learns which ranks
        failed (one object gather, also when none did, so the ranks stay in step) and warns: ``"[lightning-chips]
        WHAT failed on rank i (Type: message); it was left out and the fit goes on"`` with that rank's traceback.
        Returns the warnings given (the same list on every rank)."""
        failure: tuple[str, str] | None = None
        if rank is None or rank == self.rank:
            try:
                fn()
            except Exception as exc:  # reported to every rank below, never raised
                failure = (describe_error(exc), format_traceback(exc))
        messages = []
        for i, found in enumerate(self.objects(failure)):
            if found is not None:
                messages.append(f"[lightning-chips] {what} failed on rank {i} ({found[0]}); it was left out and the "
                                f"fit goes on. Rank {i}'s traceback:\n{found[1]}")  # fmt: skip
                warnings.warn(messages[-1], UserWarning, stacklevel=2)
        return messages

    def objects(self, mine: _T) -> list[_T]:
        """Every rank's ``mine`` (picklable), in rank order."""
        if self.trainer is None:
            return [mine]
        everyone: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def cat(self, values: Tensor) -> Tensor:
        """Every rank's ``values`` concatenated along dim 0 in rank order, on the CPU (lengths may differ; the
        other dims and the dtype must agree)."""
        if self.trainer is None:
            return values.cpu()
        strategy = self.trainer.strategy
        device = strategy.root_device
        lengths = strategy.all_gather(torch.tensor([values.shape[0]], device=device)).reshape(-1).tolist()
        padded = torch.zeros(max(lengths), *values.shape[1:], dtype=values.dtype, device=device)
        padded[: values.shape[0]] = values.to(device)
        gathered = strategy.all_gather(padded).reshape(len(lengths), max(lengths), *values.shape[1:])
        return torch.cat([gathered[i, :n] for i, n in enumerate(lengths)]).cpu()

    def skipped(self, mine: Sequence[SkippedSample]) -> tuple[list[SkippedSample], dict[str, str]]:
        """Every rank's skipped pairs, each once, in pool order, and the unreadable shards (URL -> error)."""
        merged = {_skip_key(s): s for part in self.objects(list(mine)) for s in part}
        ordered = [merged[k] for k in sorted(merged)]
        pairs = [s for s in ordered if s.kind == "pair"]
        return pairs, {s.shard: s.reason for s in ordered if s.kind == "shard" and s.shard is not None}


def _skip_key(s: SkippedSample) -> tuple:
    return (s.kind, -1 if s.index is None else s.index, s.shard or "", s.key or "", NO_ID if s.id is None else s.id)


# --------------------------------------------------------------------------------------------------------------
# rows: features or scores of pool pairs with where they are in the pool
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """Pairs read in a pass: their features (or None once scored), scores, pool positions and order keys."""

    ids: Tensor
    index: Tensor  # dataset index (map-style pools) or the id (shard pools)
    order: Tensor  # pool order: the dataset index, or a shard pool's order key, or the read order
    labels: Tensor | None
    features: PairFeatures | None = None
    scores: Tensor | None = None
    uids: list[Id] | None = None  # the ids as given, when they are strings (``ids`` holds their keys)
    groups: Tensor | None = None  # [n, F] keys of the ``group_by`` values (:class:`GroupEncoder`)

    def take(self, rows: Tensor) -> _Rows:
        return _Rows(
            self.ids[rows], self.index[rows], self.order[rows], None if self.labels is None else self.labels[rows],
            None if self.features is None else self.features.index(rows),
            None if self.scores is None else self.scores[rows],
            None if self.uids is None else [self.uids[i] for i in rows.tolist()],
            None if self.groups is None else self.groups[rows],
        )  # fmt: skip

    @staticmethod
    def cat(parts: list[_Rows]) -> _Rows:
        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        features = [p.features for p in parts]
        uids = None if all(p.uids is None for p in parts) else [u for p in parts for u in _uids_of(p)]
        return _Rows(
            torch.cat([p.ids for p in parts]), torch.cat([p.index for p in parts]), torch.cat([p.order for p in parts]),
            join("labels"), None if any(f is None for f in features) else PairFeatures.cat(features),  # type: ignore[arg-type]
            join("scores"), uids, join("groups"),
        )  # fmt: skip

    def keep_first(self, positional: bool = False) -> tuple[_Rows, list[SkippedSample]]:
        """The rows in pool order with each id once (its first row); the other rows as skipped samples (with their
        dataset index when ``positional``)."""
        rows = self.take(torch.argsort(self.order, stable=True))
        ids = rows.ids.numpy()
        keep = np.zeros(len(ids), dtype=bool)
        keep[np.unique(ids, return_index=True)[1]] = True
        given = _uids_of(rows)
        duplicates = [
            SkippedSample(DUPLICATE_REASON, id=given[i], index=int(rows.index[i]) if positional else None)
            for i in np.flatnonzero(~keep)
        ]  # fmt: skip
        return rows.take(torch.from_numpy(np.flatnonzero(keep))), duplicates


def _uids_of(rows: _Rows) -> list[Id]:
    """The ids of ``rows`` as given (int ids are their keys)."""
    return rows.uids if rows.uids is not None else rows.ids.tolist()


def _gather_rows(collective: Collective, mine: _Rows | None, *, features: bool) -> _Rows:
    """Every rank's rows (a rank without any sends none), in rank order."""
    shapes = collective.objects(None if mine is None else (
        mine.labels is not None,
        None if mine.features is None else (mine.features.image.shape[1], mine.features.text.shape[1]),
        0 if mine.groups is None else mine.groups.shape[1],
    ))  # fmt: skip
    present = [s for s in shapes if s is not None]
    if not present:
        empty = torch.zeros(0, dtype=torch.int64)
        return _Rows(empty, empty, empty, None, None, torch.zeros(0))
    with_labels = all(s[0] for s in present)
    if mine is None:
        empty = torch.zeros(0, dtype=torch.int64)
        dims = present[0][1]
        mine = _Rows(empty, empty, empty, empty if with_labels else None,
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
    rows = _Rows(collective.cat(mine.ids), collective.cat(mine.index), collective.cat(mine.order), labels,
                 gathered_features, None if mine.scores is None else collective.cat(mine.scores))  # fmt: skip
    if mine.groups is not None or any(s[2] for s in present):
        width = next(s[2] for s in present if s[2])
        own_groups = mine.groups if mine.groups is not None else torch.zeros(0, width, dtype=torch.int64)
        rows.groups = collective.cat(own_groups)
    if gathered_uids is not None:
        rows.uids = [k if u is None else u for u, k in zip(gathered_uids, rows.ids.tolist(), strict=True)]
    return rows


def _iter_rows(
    adapter: CLIPAdapter,
    items: Iterable[PoolItem],
    sink: list[SkippedSample],
    *,
    device: torch.device | str,
    progress: bool,
    description: str,
    precision: Callable[[], contextlib.AbstractContextManager],
    groups: GroupEncoder | None = None,
) -> Iterator[_Rows]:
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
            yield _Rows(features.ids.cpu(), index, order, labels, features, uids=uids, groups=keys)


def _extract(adapter: CLIPAdapter, items: Iterable[PoolItem], sink: list[SkippedSample],
             **kwargs: Any) -> _Rows | None:  # fmt: skip
    parts = [rows for rows in _iter_rows(adapter, items, sink, **kwargs)]
    for rows in parts:
        rows.features = rows.features.to("cpu")  # type: ignore[union-attr]
    return _Rows.cat(parts) if parts else None


# --------------------------------------------------------------------------------------------------------------
# prepare and score
# --------------------------------------------------------------------------------------------------------------
def _ordinary(features: PairFeatures) -> PairFeatures:
    """A copy made outside inference mode (inference tensors cannot enter autograd)."""
    labels = None if features.labels is None else features.labels.clone()
    return PairFeatures(features.ids.clone(), features.image.clone(), features.text.clone(), labels)


def prepare_scorer(
    scorer: Scorer,
    endpoint: EndPoint,
    target: PairFeatures | None,
    pool_sample: PairFeatures,
    context: RoundContext,
    device: torch.device | str,
) -> None:
    """Prepare ``scorer`` for a round: id-ordered inputs on ``device``, ordinary tensors, autograd on.

    Example::

        >>> prepare_scorer(CHIPS(), adapter.endpoint(), target, sample, RoundContext(round=2), "cuda")  # doctest: +SKIP
    """
    with torch.inference_mode(False), torch.enable_grad():
        target = None if target is None else _ordinary(target.sorted_by_id().to(device))
        scorer.prepare(endpoint, target, _ordinary(pool_sample.sorted_by_id().to(device)), context)


def score_batch(scorer: Scorer, batch: PairFeatures) -> Tensor:
    """``[B]`` float32 CPU scores of a batch of pool pairs (computed with autocast off).

    Raises:
        FloatingPointError: NaN or inf scores, naming the scorer, the round and the first ids (a diverged model).
    """
    with torch.autocast(batch.image.device.type, enabled=False):
        scores = scorer.score(batch).float().cpu()
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        first = batch.ids.cpu()[~finite][:5].tolist()
        raise FloatingPointError(
            f"{type(scorer).__name__} gave non-finite scores in round {scorer.round} (first ids: {first}); the model "
            "or the features are diverged."
        )
    return scores


def _target_features(scorer: Scorer, adapter: CLIPAdapter, pool: SelectablePool, target: Dataset | None,
                     collective: Collective, round_: int, **kwargs: Any) -> tuple[PairFeatures | None,
                                                                                   list[SkippedSample]]:  # fmt: skip
    if not scorer.requires_target:
        return None, []
    sink: list[SkippedSample] = []
    items = pool.target_batches(target, collective.rank, collective.world)
    own = collective.agree(
        round_,
        "the target features",
        lambda: _extract(adapter, items, sink, description=f"round {round_}: target", **kwargs),
    )
    rows = _gather_rows(collective, own, features=True)
    skipped, _ = collective.skipped(sink)
    if rows.features is None or len(rows.ids) == 0:
        raise ValueError(f"Every pair of the target failed to load or to pass the checks ({len(skipped)} pairs: "
                         f"{name_skipped(skipped)}).")  # fmt: skip
    return rows.keep_first()[0].features, skipped


def _sample_features(adapter: CLIPAdapter, pool: SelectablePool, size: int | None, context: RoundContext,
                     collective: Collective, **kwargs: Any) -> PairFeatures:  # fmt: skip
    r = context.round
    items = pool.pool_sample_batches(size, r, context.seed, collective.rank, collective.world)  # type: ignore[arg-type]
    own = collective.agree(
        r,
        "the pool sample features",
        lambda: _extract(adapter, items, [], description=f"round {r}: pool sample", **kwargs),
    )
    rows = _gather_rows(collective, own, features=True)
    if rows.features is None or len(rows.ids) == 0:
        raise ValueError(f"Round {r}: the pool sample holds no usable pair (every pair read failed to load).")
    return rows.keep_first()[0].features  # type: ignore[return-value]


def prepare_round(
    scorer: Scorer,
    adapter: CLIPAdapter,
    pool: SelectablePool,
    context: RoundContext,
    *,
    target: Dataset | None = None,
    pool_sample: int | None = None,
    collective: Collective | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[SkippedSample]:
    """Steps 1-2 of a round: extract the target and the pool sample (``pool_sample`` pairs drawn with
    ``(context.seed, context.round)``; None: every pair of the pool) and prepare ``scorer`` on them. Returns the
    target pairs that were skipped. ``lightning-chips score`` runs this, then :func:`score_batch` per batch."""
    collective = collective or Collective()
    device = device if device is not None else next(adapter.module.parameters()).device
    kwargs = {"device": device, "progress": progress and collective.rank == 0, "precision": precision}
    target_features, target_skipped = _target_features(scorer, adapter, pool, target, collective, context.round,
                                                       **kwargs)  # fmt: skip
    sample = _sample_features(adapter, pool, pool_sample, context, collective, **kwargs)
    collective.agree(
        context.round,
        "the prepared scorer",
        lambda: prepare_scorer(scorer, adapter.endpoint(), target_features, sample, context, device),
    )
    return target_skipped


@dataclass
class RoundScores:
    """What a round scored, the same on every rank.

    Attributes:
        ids: ``[N]`` int64 ids (keys of string ids) of the scored pairs, in pool order (dataset index; shard, then
            position).
        scores: ``[N]`` float32 scores.
        labels: ``[N]`` int64 labels when every batch had them, else None.
        indices: ``[N]`` dataset indices (map-style pools) or the ids (shard pools).
        order: ``[N]`` int64 pool positions: the dataset index (map-style pools), or ``shard * SHARD_STRIDE +
            position in the shard`` with ``shard`` the index in the pool's shard list
            (:data:`~lightning_chips.data.pool.SHARD_STRIDE`), so a pair can be read back from its own shard.
        skipped: the pool pairs that were not scored (failed to load or the checks, duplicate ids), in pool order.
        shard_errors: shards that could not be read to the end (URL -> error).
        target_skipped: the target pairs that were skipped.
        positional: whether the pool is map-style (pairs have dataset indices).
        uids: the ids as given (a string array) when the pool has string ids, else None (``ids`` are then the
            ids themselves); ``ids`` always holds the int64 keys (:mod:`lightning_chips.ids`).
        groups: the ``group_by`` field -> :class:`~lightning_chips.groups.GroupColumn` of the scored pairs (empty
            without ``group_by``).
    """

    ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None
    indices: np.ndarray
    skipped: list[SkippedSample]
    shard_errors: dict[str, str]
    target_skipped: list[SkippedSample]
    positional: bool
    uids: np.ndarray | None = None
    groups: dict[str, GroupColumn] = field(default_factory=dict)
    order: np.ndarray | None = None


def run_round(
    scorer: Scorer,
    adapter: CLIPAdapter,
    pool: SelectablePool,
    context: RoundContext,
    *,
    target: Dataset | None = None,
    pool_sample: int | None = None,
    collective: Collective | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    group_by: Sequence[str] = (),
    group_labels: Mapping[str, Mapping[str, str]] | None = None,
    max_skipped: float | None = None,
) -> RoundScores:
    """Score every pair of ``pool`` for one round (steps 1-4 of the module docstring), on every rank.

    With ``pool_sample=None`` (or at least the pool's size) the whole pool is the sample: its features are
    extracted once, gathered for ``prepare`` and scored from memory (``O(N d)`` features per rank). Otherwise the
    sample is drawn with ``(context.seed, context.round)`` and the pool streams through the towers (memory: one
    batch). ``group_by`` names metadata fields kept per scored pair (:mod:`lightning_chips.groups`); ``group_labels``
    (:func:`~lightning_chips.groups.check_group_labels`'s output) names their values.
    ``max_skipped`` (a share in [0, 1]; None: no limit) bounds the pool pairs that may fail to load or the checks
    (:func:`check_skipped`; duplicate ids do not count); the check runs on the gathered lists, so every rank
    raises the same error, before ``scorer.end_round``.

    Raises:
        ValueError: when no pool pair or no target pair could be used, or on a ``max_skipped`` outside [0, 1].
        TooManySkippedError: when more than ``max_skipped`` of the pool's pairs were skipped.
        FloatingPointError: on NaN or inf scores.

    Example::

        >>> scores = run_round(CHIPS(), resolve_adapter(model), datamodule, RoundContext(round=0))  # doctest: +SKIP
        >>> select(scores.ids, scores.scores, fraction=0.3)  # doctest: +SKIP
    """
    check_max_skipped(max_skipped)
    collective = collective or Collective()
    device = device if device is not None else next(adapter.module.parameters()).device
    r, rank, world = context.round, collective.rank, collective.world
    kwargs = {"device": device, "progress": progress and rank == 0, "precision": precision}
    size = pool.pool_size()
    sink: list[SkippedSample] = []
    groups = GroupEncoder(group_by, labels=group_labels) if group_by else None
    if pool_sample is not None and (size is None or pool_sample < size):
        target_skipped = prepare_round(
            scorer,
            adapter,
            pool,
            context,
            target=target,
            pool_sample=pool_sample,
            collective=collective,
            device=device,
            progress=progress,
            precision=precision,
        )

        def score_stream() -> _Rows | None:
            parts = []
            for rows in _iter_rows(adapter, pool.scoring_batches(rank, world), sink,
                                   description=f"round {r}: scoring", groups=groups, **kwargs):  # fmt: skip
                rows.scores = score_batch(scorer, rows.features)  # type: ignore[arg-type]
                rows.features = None
                parts.append(rows)
            return _Rows.cat(parts) if parts else None

        own = collective.agree(r, "the pool scores", score_stream)
    else:
        target_features, target_skipped = _target_features(scorer, adapter, pool, target, collective, r, **kwargs)
        items = pool.scoring_batches(rank, world)
        own = collective.agree(
            r, "the pool features",
            lambda: _extract(adapter, items, sink, description=f"round {r}: pool", groups=groups, **kwargs),
        )  # fmt: skip
        everything = _gather_rows(collective, own, features=True)
        if len(everything.ids) == 0:
            skipped, _ = collective.skipped(sink)
            raise ValueError(_nothing_scored(skipped))
        sample = everything.keep_first()[0].features

        def score_own() -> _Rows | None:
            prepare_scorer(scorer, adapter.endpoint(), target_features, sample, context, device)  # type: ignore[arg-type]
            if own is None:
                return None
            own.scores = torch.cat([score_batch(scorer, b.to(device)) for b in own.features.batches(4096)])  # type: ignore[union-attr]
            own.features = None
            return own

        own = collective.agree(r, "the pool scores", score_own)
    rows = _gather_rows(collective, own, features=False)
    skipped, shard_errors = collective.skipped(sink)
    if len(rows.ids) == 0:
        raise ValueError(_nothing_scored(skipped))
    positional = size is not None  # a pool that knows its size is map-style: its pairs have dataset indices
    check_skipped(skipped, len(rows.ids) + len(skipped), max_skipped, round_=r)
    kept, duplicates = rows.keep_first(positional)
    scorer.end_round(kept.ids.clone(), kept.scores.clone())  # type: ignore[union-attr]
    columns = {}
    if groups is not None:
        merged: list[dict[int, str]] = [{} for _ in group_by]
        for values in collective.objects(groups.values):
            for f, seen in enumerate(values):
                merged[f].update(seen)
        columns = groups.columns(kept.groups.numpy(), merged)  # type: ignore[union-attr]
    return RoundScores(
        ids=kept.ids.numpy(),
        scores=kept.scores.numpy(),  # type: ignore[union-attr]
        labels=None if kept.labels is None else kept.labels.numpy(),
        indices=kept.index.numpy(),
        skipped=sorted(skipped + duplicates, key=_skip_key),
        shard_errors=shard_errors,
        target_skipped=target_skipped,
        positional=positional,
        uids=None if kept.uids is None else ids_array(kept.uids),
        groups=columns,
        order=kept.order.numpy(),
    )


def check_max_skipped(max_skipped: float | None) -> float | None:
    """``max_skipped`` validated: None, or a share in [0, 1].

    Raises:
        ValueError: on anything else (a bool, NaN, a negative share or one above 1).
    """
    if max_skipped is None:
        return None
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, int | float) or not 0.0 <= max_skipped <= 1.0:
        raise ValueError(
            f"`max_skipped` must be a share of the pool's pairs in [0, 1] (0.05: at most 5 % may fail to load; 1: no "
            f"limit), got {max_skipped!r}."
        )
    return float(max_skipped)


def check_skipped(skipped: Sequence[SkippedSample], pairs: int, max_skipped: float | None, *, round_: int) -> None:
    """Refuse a round that skipped more than ``max_skipped`` of the ``pairs`` pool pairs it read.

    ``skipped`` are the pool pairs that failed to load or the checks (duplicate ids and unreadable shard ends are
    not in it: a pair under a repeated id is still a usable pair, and a shard's unread rest is no pair), ``pairs``
    every pair read (scored, duplicate or skipped). A share above the limit usually means a bug in the loading
    code, and skipping that many pairs would bias the selection towards the ones that load.

    Raises:
        TooManySkippedError: naming the count, the share, the limit, how to raise it, and the first loading error's
            traceback (map-style pools) or the first reasons (shard pools).
    """
    if max_skipped is None or not skipped or len(skipped) <= max_skipped * pairs:
        return
    traced = next((s for s in skipped if s.traceback), None)
    first = (
        f"The first pair that failed to load, {traced.describe()}, raised:\n{traced.traceback}"
        if traced is not None
        else f"The first skipped pairs: {name_skipped(skipped)}."
    )
    raise TooManySkippedError(
        f"Round {round_} skipped {len(skipped):,} of the pool's {pairs:,} pairs ({len(skipped) / pairs:.1%}): they "
        f"failed to load or to pass the checks, more than max_skipped={max_skipped:g} ({max_skipped:.1%}) allows. "
        "So many failures usually mean a bug in the dataset's loading code or broken data, and selecting from the "
        "pairs that load would bias the selection. Fix the data or the loader; if the data is known to be this bad, "
        f"raise the limit with `max_skipped` (e.g. max_skipped={min(1.0, _ceil_share(len(skipped), pairs)):g}; 1 = "
        f"no limit). {first}"
    )


def _ceil_share(count: int, total: int) -> float:
    """The smallest two-decimal share at least ``count / total``."""
    return -(-count * 100 // total) / 100


def _nothing_scored(skipped: Sequence[SkippedSample]) -> str:
    if skipped:
        return (f"Every pair of the pool failed to load or to pass the checks ({len(skipped)} pairs: "
                f"{name_skipped(skipped)}).")  # fmt: skip
    return "No pool pairs to score: the pool is empty (or has fewer shards than ranks)."


# --------------------------------------------------------------------------------------------------------------
# skipped samples in messages and round files
# --------------------------------------------------------------------------------------------------------------
def name_skipped(skipped: Sequence[SkippedSample], limit: int = 5) -> str:
    """The first ``limit`` skipped samples in one line."""
    named = "; ".join(s.describe() for s in skipped[:limit])
    return named + ("; ..." if len(skipped) > limit else "")


def skipped_arrays(skipped: Sequence[SkippedSample], shard_errors: dict[str, str],
                   positional: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """The round-file arrays naming a round's skipped pairs, one entry each: ``bad_ids`` (:data:`NO_ID` when the
    pair has no id), ``bad_reasons``, and ``bad_indices`` (map-style pools) or ``bad_keys`` / ``bad_shards`` (shard
    pools, ``""`` for a duplicate id) with ``unreadable_shards`` / ``shard_errors``."""
    given = [s.id for s in skipped]
    strings = any(isinstance(i, str) for i in given)
    arrays = {
        "bad_ids": (
            np.array(["" if i is None else str(i) for i in given], dtype=str)
            if strings
            else np.array([NO_ID if i is None else i for i in given], dtype=np.int64)
        ),  # fmt: skip
        "bad_reasons": np.array([s.reason for s in skipped], dtype=str),
    }
    if positional:
        arrays["bad_indices"] = np.array([-1 if s.index is None else s.index for s in skipped], dtype=np.int64)
        return arrays
    arrays["bad_keys"] = np.array([s.key or "" for s in skipped], dtype=str)
    arrays["bad_shards"] = np.array([s.shard or "" for s in skipped], dtype=str)
    arrays["unreadable_shards"] = np.array(list(shard_errors), dtype=str)
    arrays["shard_errors"] = np.array(list(shard_errors.values()), dtype=str)
    return arrays
