"""How the ranks of a selection round agree and gather (:class:`Collective`), for
:mod:`lightning_chips.engine` and the entry points that run it: without a trainer, or with one rank, nothing is
communicated (docs/selection.md, "One round").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_chips.data.checks import SkippedSample, describe_error, format_traceback

__all__ = ["NO_ID", "Collective", "skip_key"]

_T = TypeVar("_T")

NO_ID: int = int(np.iinfo(np.int64).min)
"""``bad_ids`` entry of a round file for a skipped pair that has no usable id."""


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
        merged = {skip_key(s): s for part in self.objects(list(mine)) for s in part}
        ordered = [merged[k] for k in sorted(merged)]
        pairs = [s for s in ordered if s.kind == "pair"]
        return pairs, {s.shard: s.reason for s in ordered if s.kind == "shard" and s.shard is not None}


def skip_key(s: SkippedSample) -> tuple:
    return (s.kind, -1 if s.index is None else s.index, s.shard or "", s.key or "", NO_ID if s.id is None else s.id)
