"""Scores + budget -> :class:`Selection`: which pool pairs a round trains on (top-k, stratified, weighted)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lightning_chips.groups import GroupColumn, group_arrays
from lightning_chips.io import atomic_savez
from lightning_chips.ranking import score_order

__all__ = ["Mode", "Selection", "budget_for", "draw_weighted", "select", "stratified_quotas", "write_round_file"]

Mode = Literal["topk", "weighted", "stratified"]
MODES: tuple[str, ...] = ("topk", "weighted", "stratified")


@dataclass
class Selection:
    """The pairs one selection round keeps.

    Attributes:
        ids: sorted int64 ids (keys of string ids, :mod:`lightning_chips.ids`) of the selected pairs.
        indices: dataset indices of the selected pairs, aligned with ``ids``.
        weights: sampling probabilities aligned with ``ids`` (mode ``"weighted"``), or None for uniform.
        round: the selection round.
        method: the scorer's name.
        num_candidates: how many pairs were scored.
    """

    ids: np.ndarray
    indices: np.ndarray
    weights: np.ndarray | None = None
    round: int = 0
    method: str = ""
    num_candidates: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are selected (binary search on the sorted ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.zeros(ids.shape, dtype=bool)
        pos = np.searchsorted(self.ids, ids).clip(max=len(self.ids) - 1)
        return self.ids[pos] == ids

    def overlap(self, other: Selection | None) -> float:
        """Fraction of this selection that ``other`` also selected (NaN without ``other``)."""
        if other is None or len(self) == 0:
            return float("nan")
        return float(other.contains(self.ids).mean())

    def state_dict(self) -> dict:
        return {
            "ids": self.ids.copy(),
            "indices": self.indices.copy(),
            "weights": None if self.weights is None else self.weights.copy(),
            "round": self.round,
            "method": self.method,
            "num_candidates": self.num_candidates,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Selection:
        return cls(
            ids=np.asarray(state["ids"], dtype=np.int64),
            indices=np.asarray(state["indices"], dtype=np.int64),
            weights=None if state.get("weights") is None else np.asarray(state["weights"], dtype=np.float64),
            round=int(state["round"]),
            method=str(state.get("method", "")),
            num_candidates=int(state.get("num_candidates", 0)),
        )


def budget_for(num_candidates: int, fraction: float) -> int:
    """``round(fraction * N)``, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    return max(1, min(num_candidates, int(round(fraction * num_candidates))))


def stratified_quotas(labels: np.ndarray, budget: int) -> dict[int, int]:
    """Per-label quotas proportional to label frequency summing exactly to ``budget`` (largest remainders)."""
    values, counts = np.unique(labels, return_counts=True)
    exact = counts * budget / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    remainder = budget - int(quotas.sum())
    if remainder > 0:
        order = np.lexsort((values, -(exact - quotas)))  # largest remainder first, ties by label
        quotas[order[:remainder]] += 1
    return {int(v): int(min(q, c)) for v, q, c in zip(values, quotas, counts, strict=True)}


def select(
    ids: np.ndarray,
    scores: np.ndarray,
    *,
    fraction: float | None = None,
    count: int | None = None,
    mode: Mode = "topk",
    labels: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    temperature: float = 1.0,
    round: int = 0,
    method: str = "",
) -> Selection:
    """Build the :class:`Selection` of one round from every candidate's score.

    * ``"topk"``: the ``budget`` highest scores (ties by id); sampled uniformly.
    * ``"stratified"``: per-label quotas proportional to label frequency (largest remainders, summing to the
      budget), the highest scores within each label.
    * ``"weighted"``: the top-k set, sampled with probability ``softmax(z / temperature)`` where ``z`` is the
      standardised score within the set.

    ``budget = round(fraction * N)`` (at least 1) or ``count``. Deterministic given its inputs, so every rank
    builds the same selection from the same gathered scores.

    Raises:
        ValueError: on NaN/inf scores (naming the first ids), mismatched shapes, a bad budget or mode.

    Example::

        >>> sel = select(np.array([10, 11, 12, 13]), np.array([0.5, 0.9, 0.5, 0.1]), fraction=0.5)
        >>> sel.ids.tolist()
        [10, 11]
    """
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n = ids.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"`scores` must have shape ({n},) like `ids`, got {scores.shape}.")
    if n == 0:
        raise ValueError("Nothing to select from: no pool pairs were scored.")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} scores are NaN or inf (round {round}, first ids {ids[bad][:5].tolist()}); "
            "the model or the features may have diverged."
        )
    if (fraction is None) == (count is None):
        raise ValueError("Pass exactly one of `fraction` (in (0, 1]) and `count` (>= 1).")
    budget = budget_for(n, fraction) if fraction is not None else int(count)
    if not 1 <= budget <= n:
        raise ValueError(f"`count` must be in [1, {n}] (the number of candidates), got {count}.")
    if mode not in MODES:
        raise ValueError(f"Unknown selection mode {mode!r}; use one of {MODES}.")
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.shape != (n,):
        raise ValueError(f"`indices` must have shape ({n},) like `ids`, got {indices.shape}.")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"`labels` must have shape ({n},) like `ids`, got {labels.shape}.")

    if mode == "stratified":
        if labels is None:
            raise ValueError("mode='stratified' needs labels: the pool must yield a 'label' per pair.")
        chosen_parts = []
        for label, quota in stratified_quotas(labels, budget).items():
            members = np.flatnonzero(labels == label)
            chosen_parts.append(members[score_order(ids[members], scores[members])[:quota]])
        chosen = np.concatenate(chosen_parts)
    else:
        chosen = score_order(ids, scores)[:budget]

    order = np.argsort(ids[chosen], kind="stable")
    chosen = chosen[order]
    weights = None
    if mode == "weighted":
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        s = scores[chosen]
        z = (s - s.mean()) / (s.std() + 1e-12)
        logits = z / temperature
        w = np.exp(logits - logits.max())
        weights = w / w.sum()
    return Selection(ids[chosen], indices[chosen], weights, round=round, method=method, num_candidates=n)


def draw_weighted(weights: np.ndarray, size: int, generator: torch.Generator) -> np.ndarray:
    """``size`` positions in ``weights`` drawn with replacement, position ``i`` with probability ``weights[i] /
    sum(weights)``, for any number of weights (``torch.multinomial`` stops at 2**24 categories).

    Inverse-CDF sampling: ``size`` float64 uniforms from ``generator`` against the float64 cumulative sum of the
    weights. The draws depend only on the weights and the generator's state, so every rank that seeds the same
    generator draws the same positions; a zero weight is never drawn.

    Raises:
        ValueError: on weights that are negative, NaN or inf, or sum to zero.

    Example::

        >>> draw_weighted(np.array([0.0, 1.0, 0.0]), 4, torch.Generator().manual_seed(0)).tolist()
        [1, 1, 1, 1]
    """
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(weights) == 0 or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("Sampling weights must be finite, non-negative and not all zero.")
    cdf = np.cumsum(weights)
    uniforms = torch.rand(size, generator=generator, dtype=torch.float64).numpy() * cdf[-1]
    drawn = np.searchsorted(cdf, uniforms, side="right")  # first i with cdf[i] > u: P(i) = w_i / sum(w)
    return np.minimum(drawn, np.flatnonzero(weights)[-1])  # rounding at the top end: the last drawable position


def write_round_file(
    path: str | os.PathLike,
    ids: np.ndarray,
    scores: np.ndarray,
    selected: np.ndarray,
    *,
    groups: Mapping[str, GroupColumn] | None = None,
    **meta: object,
) -> Path:
    """Atomically write ``ids`` (sorted; int64, or strings for a pool with string ids), ``scores`` and the
    ``selected`` mask (+ metadata) to ``path`` (.npz). ``groups`` (aligned with ``ids`` as given) are stored as
    :func:`~lightning_chips.groups.group_arrays`, reordered with the ids.

    Written to a temporary file in the same directory and renamed, so a crash never leaves a half-written file.
    """
    path = Path(path)
    n = len(ids)
    if len(scores) != n or len(selected) != n:
        raise ValueError(
            f"ids, scores and selected must have one entry per pair, got {n}, {len(scores)}, {len(selected)}."
        )
    given = np.asarray(ids)
    given = given.astype(str) if given.dtype.kind in "UO" else given.astype(np.int64)
    order = np.argsort(given, kind="stable")
    arrays = {
        "ids": given[order],
        "scores": np.asarray(scores, dtype=np.float32)[order],
        "selected": np.asarray(selected, dtype=bool)[order],
    }
    if groups:
        for field, column in groups.items():
            if len(column) != n:
                raise ValueError(f"group field {field!r} has {len(column)} entries for {n} pairs.")
        arrays.update(group_arrays(groups, order))
    arrays.update({key: np.asarray(value) for key, value in meta.items()})
    atomic_savez(path, **arrays)
    return path
