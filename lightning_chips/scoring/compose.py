"""Composite selectors: filter by one or more scores, then rank the survivors by another."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.scoring.base import RoundContext, Scorer, check_prepare_inputs

__all__ = ["Chain", "Intersect"]

GATE_OFFSET = 1e12
"""Subtracted from the second score of pairs the first filter drops: they rank below every kept pair."""


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
    """

    name: ClassVar[str] = "chain"

    def __init__(self, first: Scorer, second: Scorer, keep_fraction: float = 0.3) -> None:
        if not isinstance(first, Scorer) or not isinstance(second, Scorer):
            raise ValueError("Chain needs two lightning_chips Scorers (`first` filters, `second` ranks).")
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"`keep_fraction` must be in (0, 1], got {keep_fraction}.")
        self.first, self.second, self.keep_fraction = first, second, keep_fraction
        self.requires_target = first.requires_target or second.requires_target
        self.threshold: float | None = None

    def prepare(
        self,
        endpoint: EndPoint,
        target: PairFeatures | None,
        pool_sample: PairFeatures,
        context: RoundContext | None = None,
    ) -> None:
        self.use_context(context)
        # a missing target fails before the first scorer does any work
        check_prepare_inputs(self, None, target, None, uses_target=self.requires_target, uses_pool_sample=False)
        for scorer in (self.first, self.second):
            scorer.prepare(endpoint, target, pool_sample, context)
        scores = torch.cat([self.first.score(b).double().cpu() for b in pool_sample.batches(4096)])
        keep = max(1, round(self.keep_fraction * len(scores)))
        self.threshold = float(torch.sort(scores, descending=True).values[keep - 1])

    def score(self, batch: PairFeatures) -> Tensor:
        if self.threshold is None:
            raise RuntimeError("Chain.score called before prepare().")
        kept = self.first.score(batch).double() >= self.threshold
        second = self.second.score(batch).double()
        return torch.where(kept.to(second.device), second, second - GATE_OFFSET)

    def state_dict(self) -> dict:
        """The inner scorers' checkpoint state (e.g. TracIn's totals over the rounds so far)."""
        return {"first": self.first.state_dict(), "second": self.second.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])

    def summary(self) -> str:
        return f"Chain(top {self.keep_fraction:.0%} by {type(self.first).__name__}, then {type(self.second).__name__})"

    def __repr__(self) -> str:
        return f"Chain({self.first!r}, {self.second!r}, keep_fraction={self.keep_fraction})"


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

    def __init__(self, scorers: list[Scorer], fractions: list[float], *, rank_by: int = -1) -> None:
        scorers, fractions = list(scorers), [float(f) for f in fractions]
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
        for i, fraction in enumerate(fractions):
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"Intersect: fractions[{i}] must be in (0, 1], got {fraction}.")
        if not -len(scorers) <= rank_by < len(scorers):
            raise ValueError(f"`rank_by` must index one of the {len(scorers)} scorers, got {rank_by}.")
        self.scorers, self.fractions, self.rank_by = scorers, fractions, rank_by % len(scorers)
        self.requires_target = any(scorer.requires_target for scorer in scorers)
        self.thresholds: list[float] | None = None
        self.kept_in_sample: int | None = None
        self.sample_size: int | None = None

    def prepare(
        self,
        endpoint: EndPoint,
        target: PairFeatures | None,
        pool_sample: PairFeatures,
        context: RoundContext | None = None,
    ) -> None:
        self.use_context(context)
        # a missing target fails before the first scorer does any work
        check_prepare_inputs(self, None, target, None, uses_target=self.requires_target, uses_pool_sample=False)
        for scorer in self.scorers:
            scorer.prepare(endpoint, target, pool_sample, context)
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
        ranked = self.scorers[self.rank_by].score(batch).double()
        kept = torch.ones(len(batch), dtype=torch.bool, device=ranked.device)
        for i, (scorer, threshold) in enumerate(zip(self.scorers, self.thresholds, strict=True)):
            if threshold == float("-inf"):
                continue
            values = ranked if i == self.rank_by else scorer.score(batch).double()
            kept &= values.to(ranked.device) >= threshold
        return torch.where(kept, ranked, ranked - GATE_OFFSET)

    def state_dict(self) -> dict:
        return {"scorers": [scorer.state_dict() for scorer in self.scorers]}

    def load_state_dict(self, state: dict) -> None:
        for scorer, sub in zip(self.scorers, state.get("scorers", []), strict=False):
            scorer.load_state_dict(sub)

    def summary(self) -> str:
        tops = " & ".join(
            f"top {f:.0%} by {type(s).__name__}" for s, f in zip(self.scorers, self.fractions, strict=True) if f < 1.0
        )
        text = f"Intersect({tops}, ranked by {type(self.scorers[self.rank_by]).__name__}"
        if self.kept_in_sample is not None:
            text += f"; {self.kept_in_sample}/{self.sample_size} of the sample in the intersection"
        return text + ")"

    def __repr__(self) -> str:
        return f"Intersect({self.scorers!r}, fractions={self.fractions}, rank_by={self.rank_by})"
