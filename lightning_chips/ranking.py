"""The one ranking rule of a round: pairs by score, highest first, ties broken by id key (the same order on every
rank and in every run). :func:`~lightning_chips.selection.select` keeps the top of it, the galleries and the report
(:mod:`lightning_chips.gallery`) pick their top / bottom / entered / left pairs from it.

Example::

    >>> import numpy as np
    >>> score_order(np.array([7, 3, 5]), np.array([0.5, 0.9, 0.5])).tolist()  # 3 first; 5 before 7 on the tie
    [1, 2, 0]
"""

from __future__ import annotations

import numpy as np

from lightning_chips.ids import id_keys

__all__ = ["score_order"]


def score_order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row indices by score descending (NaN and inf last), ties by id key ascending (string ids by their int64
    key, :mod:`lightning_chips.ids`)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((id_keys(np.asarray(ids)), -np.where(np.isfinite(scores), scores, -np.inf)))
