"""The Random baseline: seeded uniform scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_chips.features import PairFeatures
from lightning_chips.scoring.base import Scorer, integer_setting

__all__ = ["Random", "RandomArguments"]

_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class RandomArguments:
    """The settings of :class:`Random` (validated once when built).

    Args:
        seed: the seed (an integer).
        fixed: keep the same scores in every round.

    Raises:
        ValueError: a seed that is not an integer, or a ``fixed`` that is not a bool.
    """

    seed: int = 0
    fixed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", integer_setting("seed", self.seed))
        if not isinstance(self.fixed, bool):
            raise ValueError(f"`fixed` must be True or False, got {self.fixed!r}.")


class Random(Scorer):
    """Uniform random scores in ``[0, 1)``: top-k of them is a seeded uniform subset (docs/methods.md, Random).

    A pair's score is a hash of ``(seed, round, id)``, so it is the same whatever the batch, the rank or the
    order it is scored in; every round (the ``round`` attribute the caller sets) draws a new subset unless
    ``fixed=True``.

    Args:
        seed: the seed.
        fixed: keep the same scores in every round (one fixed random subset).

    The settings are held in :attr:`arguments` (a :class:`RandomArguments`).
    """

    name: ClassVar[str] = "random"
    requires_target = False
    reads_endpoint: ClassVar[bool] = False
    reads_pool_sample: ClassVar[bool] = False
    """Nothing to prepare but the round (:meth:`Scorer.prepare` records it): scores depend only on (seed, round,
    id)."""

    def __init__(self, *, seed: int = 0, fixed: bool = False) -> None:
        self.arguments = RandomArguments(seed=seed, fixed=fixed)

    def score(self, batch: PairFeatures) -> Tensor:
        salt = self.seed * 1_000_003 + (0 if self.fixed else self.round)
        return _uniform_hash(batch.ids, salt)


def _uniform_hash(ids: Tensor, salt: int) -> Tensor:
    """SplitMix64-style hash of int64 ids to uniform floats in [0, 1) (wrapping int64 arithmetic)."""
    x = ids.to(torch.int64) + _signed(salt * _MIX)
    x = (x ^ (x >> 30)) * _M1
    x = (x ^ (x >> 27)) * _M2
    x = x ^ (x >> 31)
    return (x & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)


def _signed(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
