"""The scoring steps of a selection round, shared by :class:`~lightning_chips.DataSelectionCallback` and
``lightning-chips score`` (:mod:`lightning_chips.offline`): both prepare and score through these functions, so a
round behaves the same through either entry point (docs/selection.md, "One round").

* :func:`prepare_scorer`: ``scorer.prepare`` on the target and the pool sample in id order (the prepared state
  depends on which pairs were given, not on the order they were read in), on the scoring device, outside inference
  mode and with autograd on (some scorers train in ``prepare``: CLIP-powered's adapters, the plausibility
  reference).
* :func:`score_batch`: one batch's scores as float32 on the CPU; NaN or inf is a ``FloatingPointError`` naming the
  scorer, the round and the first ids, whichever entry point scores.

Below them, the DDP side of a callback round: :func:`agree` (the ranks agree that a local step succeeded before
every all-gather, so a failure on one rank is an error on all instead of a hang), the gathers of rows, features
and bad-sample lists, and the bookkeeping of bad samples (skipped from the scoring loaders, named in round files).
The callers keep what differs between them: the callback its schedule, state and round files; ``score`` its
per-shard part files and merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_chips.adapters import CLIPAdapter
from lightning_chips.data.checks import BadPair, describe_error
from lightning_chips.data.webdataset import BadShardSample, ShardReport
from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures, iter_features
from lightning_chips.scoring import RoundContext, Scorer

__all__ = [
    "NO_ID",
    "agree",
    "all_bad_message",
    "bad_arrays",
    "check_unique",
    "describe_bad",
    "extract_skipping_bad",
    "gather_bad",
    "gather_features",
    "gather_objects",
    "gather_rows",
    "gather_stream_bad",
    "name_bad",
    "shard_indices",
    "skip_bad",
    "skip_reports",
    "stream_bad_arrays",
    "prepare_scorer",
    "score_batch",
]

_T = TypeVar("_T")

NO_ID: int = int(np.iinfo(np.int64).min)
"""``bad_ids`` entry of a round file for a bad pair that has no usable id (its ``bad_indices`` entry names it)."""


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
    """``[B]`` float32 CPU scores of a batch of pool pairs.

    Raises:
        FloatingPointError: NaN or inf scores, naming the scorer, the round and the first ids (a diverged model).
    """
    scores = scorer.score(batch).float().cpu()
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        first = batch.ids.cpu()[~finite][:5].tolist()
        raise FloatingPointError(
            f"{type(scorer).__name__} gave non-finite scores in round {scorer.round} (first ids: {first}); the model "
            "or the features are diverged."
        )
    return scores


# --------------------------------------------------------------------------------------------------------------
# the DDP side of a round: agreement before every gather, gathers, bad-sample bookkeeping
# --------------------------------------------------------------------------------------------------------------
def shard_indices(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Contiguous shard ``rank`` of ``world`` (sizes differ by at most one)."""
    return np.array_split(indices, world)[rank]


def gather_rows(pl_module: LightningModule, values: Tensor) -> Tensor:
    """Concatenate per-rank tensors of different lengths along dim 0 (rank order), on the CPU."""
    trainer = pl_module.trainer
    if trainer.world_size == 1:
        return values.cpu()
    device = pl_module.device
    lengths = trainer.strategy.all_gather(torch.tensor([values.shape[0]], device=device)).reshape(-1).tolist()
    padded = torch.zeros(max(lengths), *values.shape[1:], dtype=values.dtype, device=device)
    padded[: values.shape[0]] = values.to(device)
    gathered = trainer.strategy.all_gather(padded).reshape(len(lengths), max(lengths), *values.shape[1:])
    return torch.cat([gathered[i, :n] for i, n in enumerate(lengths)]).cpu()


def gather_features(pl_module: LightningModule, features: PairFeatures) -> PairFeatures:
    """All ranks' features, concatenated in rank order (shards are contiguous, so in index order)."""
    return PairFeatures(
        gather_rows(pl_module, features.ids),
        gather_rows(pl_module, features.image),
        gather_rows(pl_module, features.text),
        None if features.labels is None else gather_rows(pl_module, features.labels),
    )


def bad_arrays(skipped: Sequence[BadPair]) -> dict[str, np.ndarray]:
    """A map-style round file's bad pairs: ``bad_indices``, ``bad_ids`` (:data:`NO_ID` for a pair without an id)
    and ``bad_reasons``."""
    return {
        "bad_indices": np.array([b.index for b in skipped], dtype=np.int64),
        "bad_ids": np.array([NO_ID if b.id is None else b.id for b in skipped], dtype=np.int64),
        "bad_reasons": np.array([b.reason for b in skipped], dtype=str),
    }


def stream_bad_arrays(skipped: Sequence[BadShardSample], shard_errors: dict[str, str]) -> dict[str, np.ndarray]:
    """A streaming round file's skipped samples, one entry each: ``bad_ids`` (the uid, :data:`NO_ID` when the json
    gives none), ``bad_keys`` (the tar key), ``bad_shards`` (the shard URL), ``bad_reasons``; and its shards that
    could not be read to the end: ``unreadable_shards`` (URLs) with their ``shard_errors``."""
    return {
        "bad_ids": np.array([NO_ID if b.id is None else b.id for b in skipped], dtype=np.int64),
        "bad_keys": np.array([b.key for b in skipped], dtype=str),
        "bad_shards": np.array([b.shard for b in skipped], dtype=str),
        "bad_reasons": np.array([b.reason for b in skipped], dtype=str),
        "unreadable_shards": np.array(list(shard_errors), dtype=str),
        "shard_errors": np.array(list(shard_errors.values()), dtype=str),
    }


def skip_reports(batches: Iterable[Any], sink: list[ShardReport]) -> Iterator[Any]:
    """The batches of a streaming scoring loader without their shard reports (``batch["reports"]`` of a
    :class:`~lightning_chips.data.webdataset.ShardCollate`), which go to ``sink``; a batch of reports only is left
    out."""
    for batch in batches:
        if isinstance(batch, dict) and "reports" in batch:
            sink.extend(batch.pop("reports"))
            if len(batch["id"]) == 0:
                continue
        yield batch


def skip_bad(batches: Iterable[Any], sink: dict[int, BadPair]) -> Iterator[Any]:
    """The batches of a scoring loader without their bad pairs, which go to ``sink`` (by dataset index); a batch
    of bad pairs only is left out."""
    for batch in batches:
        found = batch.pop("bad", None) if isinstance(batch, dict) else None
        if found:
            sink.update({b.index: b for b in found})
            if len(batch["id"]) == 0:
                continue
        yield batch


def extract_skipping_bad(
    adapter: CLIPAdapter, loader: Iterable[Any], sink: dict[int, BadPair], **kwargs: Any
) -> PairFeatures:
    """:func:`~lightning_chips.features.extract_features` of a scoring loader, its bad pairs into ``sink``."""
    parts = [f.to("cpu") for f in iter_features(adapter, skip_bad(loader, sink), **kwargs)]
    if not parts:
        if sink:
            raise ValueError(all_bad_message(kwargs.get("description", "the pairs"), sink))
        raise ValueError(f"No batches to extract {kwargs.get('description', 'features')} from: the loader is empty.")
    return PairFeatures.cat(parts)


def name_bad(bad: Sequence[BadPair | BadShardSample], limit: int = 5) -> str:
    named = "; ".join(describe_bad(b) for b in bad[:limit])
    return named + ("; ..." if len(bad) > limit else "")


def describe_bad(bad: BadPair | BadShardSample) -> str:
    if isinstance(bad, BadShardSample):
        return f"uid {bad.id} (key {bad.key} of {bad.shard}): {bad.reason}"
    return f"id {bad.id} (index {bad.index}): {bad.reason}"


def all_bad_message(what: str, bad: dict[int, BadPair]) -> str:
    pairs = [bad[i] for i in sorted(bad)]
    return f"Every pair of {what} failed to load or to pass the checks ({len(pairs)} pairs: {name_bad(pairs)})."


def check_unique(ids: np.ndarray, where: str) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = unique[counts > 1][:5].tolist()
        raise ValueError(
            f"Pool ids must be unique; duplicated ids in {where}: {dup} ({int((counts > 1).sum())} ids in all). "
            "Give every pool item its own int64 'id'."
        )


def agree(trainer: Trainer, round_: int, what: str, fn: Callable[[], _T]) -> _T:
    """Run this rank's part of a round, then agree with every rank that all parts succeeded (before the next
    collective, so no rank waits at a gather for one that has failed).

    The failing rank re-raises its own error; the others raise a ``RuntimeError`` naming the failed ranks and
    their errors.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the other ranks know
        error = exc
    if trainer.world_size > 1:
        flag = torch.tensor([int(error is not None)], device=trainer.strategy.root_device)
        failed = torch.nonzero(trainer.strategy.all_gather(flag).reshape(-1)).reshape(-1).tolist()
        if failed:
            messages: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(messages, None if error is None else describe_error(error))
            if error is None:
                detail = "; ".join(f"rank {i}: {messages[i]}" for i in failed)
                raise RuntimeError(
                    f"Selection round {round_} stopped on rank {trainer.global_rank}: rank(s) {failed} failed while "
                    f"computing {what} ({detail}); see that rank's traceback."
                )
    if error is not None:
        raise error
    return result


def gather_objects(trainer: Trainer, mine: _T) -> list[_T]:
    """Every rank's ``mine`` (picklable), in rank order."""
    if trainer.world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def gather_bad(trainer: Trainer, bad: dict[int, BadPair]) -> list[BadPair]:
    """Every rank's bad pairs, sorted by dataset index (the same list on every rank)."""
    merged = {b.index: b for part in gather_objects(trainer, [bad[i] for i in sorted(bad)]) for b in part}
    return [merged[i] for i in sorted(merged)]


def gather_stream_bad(trainer: Trainer, bad: list[BadShardSample],
                       errors: dict[str, str]) -> tuple[list[BadShardSample], dict[str, str]]:  # fmt: skip
    """Every rank's skipped stream samples, sorted by shard URL and key, and its unreadable shards (URL -> error),
    sorted by URL: the same on every rank, whatever the number of dataloader workers."""
    everyone = gather_objects(trainer, (bad, errors))
    merged = sorted((b for part, _ in everyone for b in part), key=lambda b: (b.shard, b.key))
    unreadable = {url: error for _, part in everyone for url, error in part.items()}
    return merged, dict(sorted(unreadable.items()))
