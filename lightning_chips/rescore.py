"""Candidate rounds: re-selection rounds that encode a part of the pool instead of all of it.

A selection round's cost is the forward pass of the towers over the pool (the scoring after it is a small share,
docs/benchmarks.md). With ``DataSelectionCallback(rescore=CandidateRescore(widen, explore, anchor))`` a round after
the first encodes and scores only its **candidates** (docs/selection.md "Candidate rounds"):

* the previous round's top ``round(widen * budget)`` pairs (its ranking, :func:`~lightning_chips.ranking.score_order`),
  where ``budget = round(fraction * P)`` and ``P`` is the number of usable pool pairs;
* the **anchor**: ``max(round(anchor * N), min_anchor)`` pairs drawn uniformly from the whole pool of ``N`` pairs
  once, with ``numpy.random.default_rng([seed, ANCHOR_STREAM])``, the same in every round. They are the pairs
  ``Scorer.prepare`` sees (a ``pool_sample`` smaller than the anchor takes a fixed part of it): a uniform sample, so
  the bank, the curvature sample and the reference statistics see the pool as a full round would, and the same
  pairs every round, as a full round over an unchanged pool does (docs/benchmarks.md, "Candidate rounds", measures
  a sample redrawn each round and one without the floor);
* an **exploration sample** of ``round(explore * N)`` pairs drawn uniformly each round with
  ``numpy.random.default_rng([seed, round])`` (the draw of a ``pool_sample`` of that size): the way back in for the
  other pairs;
* the pairs the previous round could not use (failed to load, failed the checks, repeated ids): tried again.

The other pairs **sit out** the round: they are not scored and cannot be selected. Their last score is not reused: a
score belongs to the model and the prepared scorer of its round, and mixing rounds would rank pairs by when they
were scored. The budget stays ``round(fraction * P)`` pairs of the pool (at most the candidates that could be
scored). At most ``(widen * fraction + explore) * N + max(anchor * N, min_anchor)`` pool pairs are encoded (plus the
retried ones); when that bound reaches ``N`` the round is an ordinary full round (the same scores, the same
selection).

Example::

    >>> policy = CandidateRescore(widen=2.0, explore=0.05, anchor=0.05, min_anchor=2)
    >>> plan = plan_candidates(policy, pool_size=1000, ranked=np.arange(600), unusable=np.array([7]),
    ...                        budget=300, round=1, seed=0)
    >>> plan.top, plan.anchored, plan.explored, 7 in plan.encode
    (600, 50, 50, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lightning_chips.ranking import score_order
from lightning_chips.selection import budget_for

__all__ = [
    "ANCHOR_STREAM",
    "CandidatePlan",
    "CandidateRescore",
    "CandidateState",
    "check_rescore",
    "plan_candidates",
    "plan_round",
]

ANCHOR_STREAM = 2**32 - 1
"""The second seed word of the anchor's draw (rounds use their index there)."""


@dataclass(frozen=True)
class CandidateRescore:
    """How a candidate round picks the pairs it encodes (module docstring).

    Args:
        widen: the previous round's top ``widen x budget`` pairs are encoded again (>= 1; 1.2 keeps a fifth of the
            budget again in play, so a selected pair that drops a little is still compared with the ones that rise).
        explore: share of the pool, in [0, 1], drawn uniformly each round: the pairs that re-enter the competition.
        anchor: share of the pool, in (0, 1], drawn uniformly once and encoded every round: the sample
            ``Scorer.prepare`` sees.
        min_anchor: the fewest pairs the anchor holds (>= 2; all of a smaller pool): enough pairs for stable
            ``prepare`` statistics (the bank, the noise and target shares). ``CHIPS()`` draws a bank of up to 1,024
            pairs; with 512 its selection stays within a point of full re-scoring, with 75-158 it churns
            (docs/benchmarks.md, "Candidate rounds"). On a pool under ``min_anchor / anchor`` pairs (20,480 at the
            defaults) it costs more than the ``anchor`` share.

    In YAML: ``rescore: {widen: 1.2, explore: 0.025, anchor: 0.025, min_anchor: 512}`` under the callback's
    ``init_args``.
    """

    widen: float = 1.2
    explore: float = 0.025
    anchor: float = 0.025
    min_anchor: int = 512

    def __post_init__(self) -> None:
        for name, value in (("widen", self.widen), ("explore", self.explore), ("anchor", self.anchor)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"`rescore.{name}` must be a number, got {value!r}.")
        if self.widen < 1:
            raise ValueError(
                f"`rescore.widen` must be >= 1 (the previous round's top widen x budget pairs are scored again; below "
                f"1 the round could not keep its own selection), got {self.widen}."
            )
        if not 0 <= self.explore <= 1:
            raise ValueError(
                f"`rescore.explore` must be a share of the pool in [0, 1] (0.025: 2.5 % of the pool drawn each round "
                f"to re-enter the competition), got {self.explore}."
            )
        if isinstance(self.min_anchor, bool) or not isinstance(self.min_anchor, int) or self.min_anchor < 2:
            raise ValueError(f"`rescore.min_anchor` must be an int >= 2 (pairs), got {self.min_anchor!r}.")
        if not 0 < self.anchor <= 1:
            raise ValueError(
                f"`rescore.anchor` must be a share of the pool in (0, 1] (0.025: 2.5 % of the pool drawn once, the "
                f"sample the scorer prepares on every round), got {self.anchor}."
            )

    def bound(self, fraction: float, pool_size: int) -> float:
        """The share of a pool of ``pool_size`` pairs a candidate round encodes at most: ``widen * fraction +
        explore + max(anchor, min_anchor / pool_size)``."""
        return self.widen * fraction + self.explore + max(self.anchor, self.min_anchor / pool_size)


def check_rescore(rescore: CandidateRescore | Mapping[str, Any] | str | None) -> CandidateRescore | None:
    """``rescore`` validated: None / ``"all"`` (every pair, every round), a :class:`CandidateRescore`, or its
    keyword arguments as a mapping (YAML)."""
    if rescore is None or rescore == "all":
        return None
    if isinstance(rescore, CandidateRescore):
        return rescore
    if isinstance(rescore, Mapping):
        unknown = sorted(set(rescore) - {"widen", "explore", "anchor", "min_anchor"})
        if unknown:
            raise ValueError(f"`rescore` takes `widen`, `explore`, `anchor` and `min_anchor`, got {unknown}.")
        return CandidateRescore(**rescore)
    raise ValueError(
        f"`rescore` must be None or 'all' (every pool pair every round) or CandidateRescore(widen=..., explore=..., "
        f"anchor=...) (or a mapping of those), got {rescore!r}."
    )


@dataclass
class CandidatePlan:
    """The pairs of one candidate round, as sorted dataset indices (the same on every rank).

    Attributes:
        encode: every pair the round encodes and scores.
        sample: the pairs ``Scorer.prepare`` sees (a subset of ``encode``: the anchor, or ``pool_sample`` pairs
            of it).
        top: pairs from the previous round's ranking; ``anchored``: the anchor's size; ``explored``: the
            exploration sample's size; ``retried``: pairs the previous round could not use.
    """

    encode: np.ndarray
    sample: np.ndarray
    top: int
    anchored: int
    explored: int
    retried: int

    def describe(self, pool_size: int, previous_round: int) -> str:
        return (f"top {self.top:,} of round {previous_round} + {self.anchored:,} anchor + {self.explored:,} explored"
                + (f" + {self.retried:,} retried" if self.retried else "")
                + f"; the other {pool_size - len(self.encode):,} sit out")  # fmt: skip


def plan_candidates(
    policy: CandidateRescore,
    *,
    pool_size: int,
    ranked: np.ndarray,
    unusable: np.ndarray,
    budget: int,
    round: int,
    seed: int,
    pool_sample: int | None = None,
) -> CandidatePlan | None:
    """The candidates of round ``round`` (module docstring), or None when the round must score every pair (its
    bound ``round(widen * budget) + max(round(anchor * N), min_anchor) + round(explore * N)`` reaches ``N``, or the
    previous round's ranking is shorter than the widened budget, e.g. after a resume with a larger ``widen``).

    Args:
        ranked: the previous round's dataset indices, best first (at least its top ``round(widen * budget)``).
        unusable: dataset indices the previous round could not use.
        budget: this round's budget in pairs.
        pool_sample: the callback's ``pool_sample`` (None: the whole anchor prepares the scorer).
    """
    top = min(pool_size, round_half(policy.widen * budget))
    anchored = min(pool_size, max(policy.min_anchor, round_half(policy.anchor * pool_size)))
    explored = round_half(policy.explore * pool_size)
    if top + anchored + explored >= pool_size or len(ranked) < top:
        return None
    anchor = np.sort(np.random.default_rng([seed, ANCHOR_STREAM]).choice(pool_size, size=anchored, replace=False))
    sample = np.sort(np.random.default_rng([seed, round]).choice(pool_size, size=explored, replace=False))
    chosen = np.asarray(ranked[:top], dtype=np.int64)
    retried = np.asarray(unusable, dtype=np.int64)
    retried = retried[retried < pool_size]
    encode = np.unique(np.concatenate([chosen[chosen < pool_size], anchor, sample, retried]))
    prepare = anchor
    if pool_sample is not None and pool_sample < len(anchor):
        pick = np.random.default_rng([seed, ANCHOR_STREAM - 1]).choice(len(anchor), size=pool_sample, replace=False)
        prepare = np.sort(anchor[pick])
    return CandidatePlan(encode.astype(np.int64), prepare.astype(np.int64), len(chosen), anchored, explored,
                         len(retried))  # fmt: skip


def plan_round(policy: CandidateRescore | None, state: CandidateState | None, *, pool_size: int | None,
               fraction: float, round: int, seed: int,
               pool_sample: int | None) -> tuple[CandidatePlan | None, int | None]:  # fmt: skip
    """A callback round's candidates and budget in pairs: ``(None, None)`` for a full round (no policy, no earlier
    round, a pool of unknown size), ``(None, budget)`` when the candidates would cover the pool."""
    if policy is None or state is None or pool_size is None:
        return None, None
    budget = budget_for(state.pool_pairs(pool_size), fraction)
    plan = plan_candidates(policy, pool_size=pool_size, ranked=state.ranked, unusable=state.never_seen(pool_size),
                           budget=budget, round=round, seed=seed, pool_sample=pool_sample)  # fmt: skip
    return plan, budget


def kept_ranking(policy: CandidateRescore, pool_size: int, fraction: float) -> int:
    """How much of a round's ranking the next candidate round may need: ``round(widen * budget)`` of the whole pool
    (the budget of the usable pairs is at most that)."""
    return min(pool_size, round_half(policy.widen * budget_for(pool_size, fraction)))


def round_half(value: float) -> int:
    """``value`` rounded half up (Python's ``round`` rounds half to even)."""
    return int(math.floor(value + 0.5))


@dataclass
class CandidateState:
    """What the next candidate round needs from the last round, kept in the callback's checkpoint state.

    Attributes:
        ranked: the last round's dataset indices, best first, its top ``round(widen * budget)`` only.
        unusable: dataset indices the last round could not use (and earlier rounds, unless scored since).
        pool_size: the pool's size at the last round (indices at or above it were never seen).
        round: the round that ranked them.
    """

    ranked: np.ndarray
    unusable: np.ndarray
    pool_size: int
    round: int

    def pool_pairs(self, pool_size: int) -> int:
        """Usable pool pairs: the pool less the pairs known to be unusable."""
        return pool_size - int((self.unusable < pool_size).sum())

    def never_seen(self, pool_size: int) -> np.ndarray:
        """Unusable pairs and pairs added to the pool since the last round: each candidate round tries them."""
        return np.union1d(self.unusable[self.unusable < pool_size], np.arange(self.pool_size, pool_size))

    @classmethod
    def after_round(
        cls,
        previous: CandidateState | None,
        *,
        indices: np.ndarray,
        ids: np.ndarray,
        scores: np.ndarray,
        skipped_indices: np.ndarray,
        keep: int,
        pool_size: int,
        round: int,
        full: bool,
    ) -> CandidateState:
        """The state after a round that scored the pairs at ``indices`` (``ids``, ``scores``) and skipped
        ``skipped_indices``, keeping the top ``keep`` of its ranking. A full round forgets the earlier unusable
        pairs; a candidate round keeps those it did not score."""
        order = score_order(ids, scores)[:keep]
        unusable = np.asarray(skipped_indices, dtype=np.int64)
        if previous is not None and not full:
            earlier = previous.unusable[~np.isin(previous.unusable, indices)]
            unusable = np.union1d(earlier, unusable)
        return cls(np.asarray(indices, dtype=np.int64)[order], np.unique(unusable), pool_size, round)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints (a checkpoint loads them with ``weights_only=True``)."""
        return {k: (torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CandidateState:
        def array(value: Any) -> np.ndarray:
            return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.int64).reshape(-1)

        return cls(array(state["ranked"]), array(state["unusable"]), int(state["pool_size"]), int(state["round"]))
