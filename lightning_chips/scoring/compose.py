"""Composite selectors: filter by one score, then rank the survivors by another."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_chips.adapters import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.scoring.base import Scorer

__all__ = ["Chain"]

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
        self.threshold: float | None = None

    @property
    def requires_target(self) -> bool:  # type: ignore[override]
        return self.first.requires_target or self.second.requires_target

    def prepare(self, endpoint: EndPoint, target: PairFeatures | None, pool_sample: PairFeatures) -> None:
        for scorer in (self.first, self.second):
            scorer.round, scorer.learning_rate, scorer.text_encoder = self.round, self.learning_rate, self.text_encoder
            scorer.prepare(endpoint, target, pool_sample)
        scores = torch.cat([self.first.score(b).double().cpu() for b in pool_sample.batches(4096)])
        keep = max(1, round(self.keep_fraction * len(scores)))
        self.threshold = float(torch.sort(scores, descending=True).values[keep - 1])

    def score(self, batch: PairFeatures) -> Tensor:
        if self.threshold is None:
            raise RuntimeError("Chain.score called before prepare().")
        kept = self.first.score(batch).double() >= self.threshold
        second = self.second.score(batch).double()
        return torch.where(kept.to(second.device), second, second - GATE_OFFSET)

    def summary(self) -> str:
        return f"Chain(top {self.keep_fraction:.0%} by {type(self.first).__name__}, then {type(self.second).__name__})"

    def __repr__(self) -> str:
        return f"Chain({self.first!r}, {self.second!r}, keep_fraction={self.keep_fraction})"
