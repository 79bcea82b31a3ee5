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

The rank bookkeeping a round needs lives beside it: :mod:`lightning_chips.collective` (agree and gather) and
:mod:`lightning_chips.round_rows` (rows with their pool positions, gathers, duplicate ids), which
``lightning-chips score`` uses for the same decisions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import Dataset

from lightning_chips.adapters import CLIPAdapter
from lightning_chips.collective import NO_ID, Collective, skip_key
from lightning_chips.data.checks import SkippedSample
from lightning_chips.data.pool import IndexedPool, PoolItem, SelectablePool
from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.groups import GroupColumn, GroupEncoder
from lightning_chips.ids import ids_array
from lightning_chips.rescore import CandidatePlan
from lightning_chips.round_rows import DUPLICATE_REASON, Rows, extract_rows, gather_rows, iter_rows
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
    "round_learning_rate",
    "run_round",
    "score_batch",
    "skipped_arrays",
]


class TooManySkippedError(RuntimeError):
    """A round skipped more of the pool's pairs (failed to load or the checks) than ``max_skipped`` allows: a
    loading bug or broken data that would bias the selection (see :func:`check_skipped`)."""


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
        lambda: extract_rows(adapter, items, sink, description=f"round {round_}: target", **kwargs),
    )
    rows = gather_rows(collective, own, features=True)
    skipped, _ = collective.skipped(sink)
    if rows.features is None or len(rows.ids) == 0:
        raise ValueError(f"Every pair of the target failed to load or to pass the checks ({len(skipped)} pairs: "
                         f"{name_skipped(skipped)}).")  # fmt: skip
    return rows.keep_first()[0].features, skipped


def _sample_features(adapter: CLIPAdapter, pool: SelectablePool, size: int | None, context: RoundContext,
                     collective: Collective, indices: np.ndarray | None = None,
                     **kwargs: Any) -> PairFeatures:  # fmt: skip
    r = context.round
    if indices is not None:  # a candidate round's sample (lightning_chips.rescore)
        items = _indexed(pool).indexed_batches(indices, collective.rank, collective.world)
    else:
        items = pool.pool_sample_batches(size, r, context.seed, collective.rank, collective.world)  # type: ignore[arg-type]
    own = collective.agree(
        r,
        "the pool sample features",
        lambda: extract_rows(adapter, items, [], description=f"round {r}: pool sample", **kwargs),
    )
    rows = gather_rows(collective, own, features=True)
    if rows.features is None or len(rows.ids) == 0:
        raise ValueError(f"Round {r}: the pool sample holds no usable pair (every pair read failed to load).")
    return rows.keep_first()[0].features  # type: ignore[return-value]


def prepare_round(
    scorer: Scorer,
    adapter: CLIPAdapter,
    pool: SelectablePool,
    context: RoundContext,
    *,
    pool_sample: int | None = None,
    target: Dataset | None = None,
    collective: Collective | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    sample_indices: np.ndarray | None = None,
) -> list[SkippedSample]:
    """Steps 1-2 of a round: extract the target and the pool sample (``pool_sample`` pairs drawn with
    ``(context.seed, context.round)``; None: every pair of the pool; or the pairs at ``sample_indices`` of an
    :class:`~lightning_chips.data.pool.IndexedPool`) and prepare ``scorer`` on them. Returns the target pairs that
    were skipped. ``lightning-chips score`` runs this, then :func:`score_batch` per batch."""
    collective = collective or Collective()
    device = device if device is not None else next(adapter.module.parameters()).device
    kwargs = {"device": device, "progress": progress and collective.rank == 0, "precision": precision}
    target_features, target_skipped = _target_features(scorer, adapter, pool, target, collective, context.round,
                                                       **kwargs)  # fmt: skip
    sample = _sample_features(adapter, pool, pool_sample, context, collective, sample_indices, **kwargs)
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
        encoded: pool pairs the scoring pass read (scored, skipped or duplicate): the pool, or a candidate round's
            candidates.
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
    encoded: int = 0


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
    candidates: CandidatePlan | None = None,
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

    ``candidates`` (a candidate round, :mod:`lightning_chips.rescore`; the pool must be an
    :class:`~lightning_chips.data.pool.IndexedPool`): only the pairs at ``candidates.encode`` are read and scored,
    and ``scorer.prepare`` sees the pairs at ``candidates.sample`` (a subset of them) instead of the pool sample.
    With ``pool_sample=None`` their features are extracted once, as the whole pool's are in a full round.

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
    what = "candidates" if candidates is not None else "pool"

    def scoring_items() -> Iterable[PoolItem]:
        if candidates is None:
            return pool.scoring_batches(rank, world)
        return _indexed(pool).indexed_batches(candidates.encode, rank, world)

    if pool_sample is not None and (size is None or pool_sample < size):
        target_skipped = prepare_round(scorer, adapter, pool, context, pool_sample=pool_sample, target=target,
                                       collective=collective, device=device, progress=progress, precision=precision,
                                       sample_indices=None if candidates is None else candidates.sample)  # fmt: skip

        def score_stream() -> Rows | None:
            parts = []
            for rows in iter_rows(adapter, scoring_items(), sink, description=f"round {r}: scoring {what}",
                                  groups=groups, **kwargs):  # fmt: skip
                rows.scores = score_batch(scorer, rows.features)  # type: ignore[arg-type]
                rows.features = None
                parts.append(rows)
            return Rows.cat(parts) if parts else None

        own = collective.agree(r, "the pool scores", score_stream)
    else:
        target_features, target_skipped = _target_features(scorer, adapter, pool, target, collective, r, **kwargs)
        own = collective.agree(
            r, f"the {what} features",
            lambda: extract_rows(adapter, scoring_items(), sink, description=f"round {r}: {what}", groups=groups,
                                 **kwargs),
        )  # fmt: skip
        everything = gather_rows(collective, own, features=True)
        if len(everything.ids) == 0:
            skipped, _ = collective.skipped(sink)
            raise ValueError(_nothing_scored(skipped))
        first = everything.keep_first()[0]
        if candidates is not None:  # the exploration sample, not the top of the last round, prepares the scorer
            first = first.take(torch.from_numpy(np.flatnonzero(np.isin(first.index.numpy(), candidates.sample))))
            if len(first.ids) == 0:
                raise ValueError(f"Round {r}: the exploration sample holds no usable pair (every pair read failed).")
        sample = first.features

        def score_own() -> Rows | None:
            prepare_scorer(scorer, adapter.endpoint(), target_features, sample, context, device)  # type: ignore[arg-type]
            if own is None:
                return None
            own.scores = torch.cat([score_batch(scorer, b.to(device)) for b in own.features.batches(4096)])  # type: ignore[union-attr]
            own.features = None
            return own

        own = collective.agree(r, "the pool scores", score_own)
    rows = gather_rows(collective, own, features=False)
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
        skipped=sorted(skipped + duplicates, key=skip_key),
        shard_errors=shard_errors,
        target_skipped=target_skipped,
        positional=positional,
        uids=None if kept.uids is None else ids_array(kept.uids),
        groups=columns,
        order=kept.order.numpy(),
        encoded=len(rows.ids) + len(skipped),
    )


def _indexed(pool: SelectablePool) -> IndexedPool:
    if not isinstance(pool, IndexedPool):
        raise TypeError(
            f"A candidate round reads pairs by dataset index, which {type(pool).__name__} cannot (it has no "
            "`indexed_batches`): use a map-style pool (ScoredSubsetDataModule), or score every pair (rescore=None)."
        )
    return pool


def round_learning_rate(model: object, optimizers: Sequence[Optimizer] = ()) -> float:
    """The learning rate a round weights its scores by (:attr:`RoundContext.learning_rate`: TracIn's ``eta``), read
    the same way by every entry point: the first optimizer's first parameter group's ``lr`` (the callback passes the
    trainer's optimizers), else the model's ``lr`` (an attribute or a hyperparameter, as ``OpenCLIPModule(lr=...)``
    has; ``lightning-chips score``, a predict pass without optimizers, unless ``--learning_rate`` is given), else 1.
    """
    if optimizers:
        return float(optimizers[0].param_groups[0]["lr"])
    hparams = getattr(model, "hparams", None)
    lr = getattr(model, "lr", hparams.get("lr") if hasattr(hparams, "get") else None)
    return float(lr) if isinstance(lr, int | float) else 1.0


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
