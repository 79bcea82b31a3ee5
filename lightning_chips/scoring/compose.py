"""Composite selectors: filter by one or more scores, then rank the survivors by another."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.scoring.base import Scorer, integer_setting

__all__ = ["Chain", "ChainArguments", "Intersect", "IntersectArguments"]

GATE_OFFSET = 1e12
"""Subtracted from the second score of pairs the first filter drops: they rank below every kept pair."""


def _fraction(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{label} must be in (0, 1], got {value!r}.")
    return float(value)


def _part_metrics(parts: Iterable[tuple[str, Scorer]]) -> dict[str, float]:
    return {f"{prefix}.{name}": value for prefix, part in parts for name, value in part.round_metrics().items()}


class _PartScores:
    """This rank's scores, in the current round, by the parts of a composite that keep history (TracIn), so that
    :meth:`Scorer.end_round` can hand each such part its own scores of every rank's pairs.

    The composite's own score does not carry them: a gated pair's score is ``second - 1e12``, which the engine's
    float32 gather rounds to a multiple of 65536, and a filter's scores are not in it at all. So each rank keeps
    its parts' scores (float32, as the engine gathers scores) of the pairs it scored, and ``end_round``, which the
    engine calls on every rank, gathers them across the ranks of the ``torch.distributed`` group (nothing is
    communicated in one process) and gives each part the scores of the round's ids."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def add(self, index: int, part: Scorer, ids: Tensor, scores: Tensor) -> None:
        if part.keeps_history:
            self.chunks.setdefault(index, []).append((ids.detach().cpu().long(), scores.detach().float().cpu()))

    def clear(self) -> None:
        self.chunks = {}

    def end_round(self, parts: Sequence[Scorer], ids: Tensor) -> None:
        """Forward :meth:`Scorer.end_round` to the parts that keep history (collective: every rank calls it)."""
        mine = {i: (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
                for i, chunks in self.chunks.items()}  # fmt: skip
        self.chunks = {}
        everyone = _all_ranks(mine)
        ids = ids.cpu().long()
        for i, part in enumerate(parts):
            gathered = [rank[i] for rank in everyone if i in rank]
            if not part.keeps_history or not gathered:  # a part the composite never scored (it neither filters
                continue  # nor ranks) has nothing to record
            part_ids, part_scores = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
            order = torch.argsort(part_ids, stable=True)
            part_ids, part_scores = part_ids[order], part_scores[order]
            pos = torch.searchsorted(part_ids, ids).clamp(max=max(len(part_ids) - 1, 0))
            found = part_ids[pos] == ids if len(part_ids) else torch.zeros(len(ids), dtype=torch.bool)
            part.end_round(ids[found], part_scores[pos[found]])


def _prepare_parts(
    composite: Chain | Intersect,
    parts: Sequence[Scorer],
    endpoint: EndPoint,
    target: PairFeatures | None,
    pool_sample: PairFeatures,
) -> None:
    """Forget the last round's part scores and prepare every part with the composite's context. The composite's
    own :meth:`Scorer.prepare` has checked only the target (``reads_endpoint`` and ``reads_pool_sample`` are off),
    so a missing target fails before the first part does any work; each part checks what it reads."""
    composite._part_scores.clear()
    for part in parts:
        part.prepare(endpoint, target, pool_sample, composite.context)


def _all_ranks(mine: Any) -> list[Any]:
    """Every rank's ``mine`` in rank order (``[mine]`` without an initialised process group of several ranks)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


@dataclass(frozen=True)
class ChainArguments:
    """The settings of :class:`Chain` (validated once when built; see its Args).

    Raises:
        ValueError: ``first`` or ``second`` not a :class:`Scorer`, or ``keep_fraction`` outside (0, 1].
    """

    first: Scorer
    second: Scorer
    keep_fraction: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.first, Scorer) or not isinstance(self.second, Scorer):
            raise ValueError("Chain needs two lightning_chips Scorers (`first` filters, `second` ranks).")
        object.__setattr__(self, "keep_fraction", _fraction("`keep_fraction`", self.keep_fraction))


@dataclass(frozen=True)
class IntersectArguments:
    """The settings of :class:`Intersect` (validated once when built; see its Args). ``scorers`` and
    ``fractions`` are kept as tuples, ``rank_by`` as an index in ``[0, len(scorers))``.

    Raises:
        ValueError: see :class:`Intersect`.
    """

    scorers: tuple[Scorer, ...]
    fractions: tuple[float, ...]
    rank_by: int = -1

    def __post_init__(self) -> None:
        scorers, fractions = tuple(self.scorers), tuple(self.fractions)
        if len(scorers) < 2:
            raise ValueError(f"Intersect needs at least two scorers to intersect, got {len(scorers)}.")
        for i, scorer in enumerate(scorers):
            if not isinstance(scorer, Scorer):
                raise ValueError(f"Intersect: scorers[{i}] is a {type(scorer).__name__}, not a lightning_chips Scorer.")
        if len(fractions) != len(scorers):
            raise ValueError(
                f"Intersect needs one fraction per scorer: got {len(fractions)} fractions for {len(scorers)} scorers "
                "(use 1.0 for a scorer that only ranks)."
            )
        fractions = tuple(_fraction(f"Intersect: fractions[{i}]", fraction) for i, fraction in enumerate(fractions))
        rank_by = integer_setting("rank_by", self.rank_by)
        if not -len(scorers) <= rank_by < len(scorers):
            raise ValueError(f"`rank_by` must index one of the {len(scorers)} scorers, got {rank_by}.")
        object.__setattr__(self, "scorers", scorers)
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "rank_by", rank_by % len(scorers))


class Chain(Scorer):
    """Keep the top ``keep_fraction`` of the pool by ``first``, then rank those by ``second``.

    The negCLIPLoss + NormSim recipe of Wang et al. (NeurIPS 2024): ``Chain(NegCLIPLoss(), NormSim(), 0.3)``
    with ``DataSelectionCallback(fraction=0.2)`` keeps the 30 % with the best negCLIPLoss, then among those the
    20 % of the pool with the highest NormSim_inf. The threshold of ``first`` is its ``(1 - keep_fraction)``
    quantile over the pool sample given to :meth:`prepare` (exact with the callback's default
    ``pool_sample=None``, the whole pool). Pairs below it score ``second - 1e12``, so they are selected only when
    the budget exceeds ``keep_fraction``.

    Args:
        first: the filtering scorer.
        second: the ranking scorer.
        keep_fraction: share of the pool the first filter keeps, in (0, 1].

    The settings are held in :attr:`arguments` (a :class:`ChainArguments`); :meth:`config` nests the parts'
    configs. A part that keeps history across rounds (TracIn) gets its own scores of every rank's pairs at
    :meth:`end_round`: each rank keeps its parts' scores of the pairs it scored, and ``end_round`` gathers them (the
    composite's score, ``second - 1e12`` for a filtered pair, does not hold them).
    """

    name: ClassVar[str] = "chain"
    reads_endpoint: ClassVar[bool] = False
    reads_pool_sample: ClassVar[bool] = False

    def __init__(self, first: Scorer, second: Scorer, keep_fraction: float = 0.3) -> None:
        self.arguments = ChainArguments(first=first, second=second, keep_fraction=keep_fraction)
        self.requires_target = first.requires_target or second.requires_target
        self.threshold: float | None = None
        self._part_scores = _PartScores()

    @property
    def keeps_history(self) -> bool:
        return self.first.keeps_history or self.second.keeps_history

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        _prepare_parts(self, (self.first, self.second), endpoint, target, pool_sample)
        scores = torch.cat([self.first.score(b).double().cpu() for b in pool_sample.batches(4096)])
        keep = max(1, round(self.keep_fraction * len(scores)))
        self.threshold = float(torch.sort(scores, descending=True).values[keep - 1])

    def score(self, batch: PairFeatures) -> Tensor:
        if self.threshold is None:
            raise RuntimeError("Chain.score called before prepare().")
        first, second = self.first.score(batch), self.second.score(batch)
        self._part_scores.add(0, self.first, batch.ids, first)
        self._part_scores.add(1, self.second, batch.ids, second)
        kept, second = first.double() >= self.threshold, second.double()
        return torch.where(kept.to(second.device), second, second - GATE_OFFSET)

    def end_round(self, ids: Tensor, scores: Tensor) -> None:
        """Forward the hook to the parts that keep history, each with its own scores of ``ids`` (gathered across
        ranks: the composite's ``scores`` do not hold them)."""
        if self.keeps_history:
            self._part_scores.end_round((self.first, self.second), ids)

    def state_dict(self) -> dict:
        """The inner scorers' checkpoint state (e.g. TracIn's totals over the rounds so far)."""
        return {"first": self.first.state_dict(), "second": self.second.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])

    def summary(self) -> str:
        return f"Chain(top {self.keep_fraction:.0%} by {type(self.first).__name__}, then {type(self.second).__name__})"

    def round_metrics(self) -> dict[str, float]:
        """The parts' :meth:`Scorer.round_metrics`, named ``first.<name>`` and ``second.<name>``."""
        return _part_metrics((("first", self.first), ("second", self.second)))


class Intersect(Scorer):
    """Keep the pairs in the top ``fractions[i]`` of *every* scorer, then rank the survivors by one of them.

    Rule, with ``n`` the size of the pool sample given to :meth:`prepare` and ``t_i`` the ``k_i``-th largest
    score of scorer ``i`` on it, ``k_i = max(1, round(fractions[i] * n))`` (the same quantile as :class:`Chain`)::

        kept(z)  = all_i  s_i(z) >= t_i
        score(z) = s_r(z)           if kept(z)
                   s_r(z) - 1e12    otherwise            (r = rank_by)

    so the callback's top-k is the ``rank_by`` top among the intersection of the per-scorer top sets, and pairs
    outside it are selected only once the intersection is exhausted. The thresholds are exact with the
    callback's default ``pool_sample=None`` (the whole pool). A fraction of 1 does not filter, so
    ``Intersect([a, b], [0.3, 1.0])`` is ``Chain(a, b, keep_fraction=0.3)``.

    Args:
        scorers: two or more scorers; each filters by its own top fraction.
        fractions: one share of the pool per scorer, each in (0, 1].
        rank_by: index into ``scorers`` of the scorer that ranks the survivors (default ``-1``, the last one).

    The settings are held in :attr:`arguments` (an :class:`IntersectArguments`; ``scorers`` and ``fractions`` as
    tuples, ``rank_by`` as a non-negative index); :meth:`config` nests the parts' configs. A part that keeps history
    across rounds (TracIn) gets its own scores of every rank's pairs at :meth:`end_round`, when it filters or ranks.

    Raises:
        ValueError: when fewer than two scorers are given, a scorer is not a :class:`Scorer`, the number of
            fractions differs from the number of scorers, a fraction is outside (0, 1], or ``rank_by`` is out of
            range.

    Example::

        >>> from lightning_chips.scoring import CLIPScore, Intersect, NegCLIPLoss, NormSim
        >>> # pairs in the top 50 % by CLIPScore and the top 40 % by negCLIPLoss, ranked by NormSim_inf
        >>> Intersect([CLIPScore(), NegCLIPLoss(), NormSim()], [0.5, 0.4, 1.0]).summary()
        'Intersect(top 50% by CLIPScore & top 40% by NegCLIPLoss, ranked by NormSim)'

    From YAML (``scorer:`` of :class:`~lightning_chips.DataSelectionCallback`)::

        class_path: lightning_chips.scoring.Intersect
        init_args:
          scorers:
            - class_path: lightning_chips.scoring.CLIPScore
            - class_path: lightning_chips.scoring.NormSim
          fractions: [0.5, 1.0]
    """

    name: ClassVar[str] = "intersect"
    reads_endpoint: ClassVar[bool] = False
    reads_pool_sample: ClassVar[bool] = False

    def __init__(self, scorers: list[Scorer], fractions: list[float], *, rank_by: int = -1) -> None:
        self.arguments = IntersectArguments(scorers=scorers, fractions=fractions, rank_by=rank_by)
        self.requires_target = any(scorer.requires_target for scorer in self.scorers)
        self.thresholds: list[float] | None = None
        self.kept_in_sample: int | None = None
        self.sample_size: int | None = None
        self._part_scores = _PartScores()

    @property
    def keeps_history(self) -> bool:
        return any(scorer.keeps_history for scorer in self.scorers)

    def prepare_round(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        _prepare_parts(self, self.scorers, endpoint, target, pool_sample)
        n = len(pool_sample)
        thresholds, kept = [], torch.ones(n, dtype=torch.bool)
        for scorer, fraction in zip(self.scorers, self.fractions, strict=True):
            if fraction >= 1.0:  # no filter: skip a pass over the sample
                thresholds.append(float("-inf"))
                continue
            scores = torch.cat([scorer.score(b).double().cpu() for b in pool_sample.batches(4096)])
            keep = max(1, round(fraction * n))
            thresholds.append(float(torch.sort(scores, descending=True).values[keep - 1]))
            kept &= scores >= thresholds[-1]
        self.thresholds, self.kept_in_sample, self.sample_size = thresholds, int(kept.sum()), n

    def score(self, batch: PairFeatures) -> Tensor:
        if self.thresholds is None:
            raise RuntimeError("Intersect.score called before prepare().")
        ranked = self.scorers[self.rank_by].score(batch)
        self._part_scores.add(self.rank_by, self.scorers[self.rank_by], batch.ids, ranked)
        ranked = ranked.double()
        kept = torch.ones(len(batch), dtype=torch.bool, device=ranked.device)
        for i, (scorer, threshold) in enumerate(zip(self.scorers, self.thresholds, strict=True)):
            if threshold == float("-inf"):
                continue
            if i == self.rank_by:
                values = ranked
            else:
                values = scorer.score(batch)
                self._part_scores.add(i, scorer, batch.ids, values)
            kept &= values.double().to(ranked.device) >= threshold
        return torch.where(kept, ranked, ranked - GATE_OFFSET)

    def end_round(self, ids: Tensor, scores: Tensor) -> None:
        """Forward the hook to the parts that keep history and were scored (they filter or rank), each with its own
        scores of ``ids`` (gathered across ranks: the composite's ``scores`` do not hold them)."""
        if self.keeps_history:
            self._part_scores.end_round(self.scorers, ids)

    def state_dict(self) -> dict:
        return {"scorers": [scorer.state_dict() for scorer in self.scorers]}

    def load_state_dict(self, state: dict) -> None:
        for scorer, sub in zip(self.scorers, state.get("scorers", []), strict=False):
            scorer.load_state_dict(sub)

    def round_metrics(self) -> dict[str, float]:
        """The parts' :meth:`Scorer.round_metrics`, named ``<i>.<name>`` (``i`` the part's position)."""
        return _part_metrics((str(i), scorer) for i, scorer in enumerate(self.scorers))

    def summary(self) -> str:
        tops = " & ".join(
            f"top {f:.0%} by {type(s).__name__}" for s, f in zip(self.scorers, self.fractions, strict=True) if f < 1.0
        )
        text = f"Intersect({tops}, ranked by {type(self.scorers[self.rank_by]).__name__}"
        if self.kept_in_sample is not None:
            text += f"; {self.kept_in_sample}/{self.sample_size} of the sample in the intersection"
        return text + ")"
