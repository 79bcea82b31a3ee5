"""Pool ids: int64 integers or strings (DataComp uids, WebDataset keys, file names), one int64 key each inside.

Every computation of a round (scorers, selections, samplers, gathers) works on int64 *keys*: an integer id is its
own key; a string id's key is a stable 62-bit digest of its UTF-8 bytes, offset to ``[2**62, 2**63)`` so that it
never equals a non-negative integer id below ``2**62``. The key of a string is the same in every process and
every run, so a round file, a ``scores.npz`` and a checkpoint written with string ids are read back by
recomputing the keys. What users read (round files, ``scores.npz``, ``select`` outputs) holds the ids as they were
given: int64 arrays for integer ids, string arrays for string ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["STRING_KEY_BASE", "Id", "id_key", "id_keys", "ids_array"]

Id = int | str
"""A pool id as the user gives it."""

STRING_KEY_BASE = 1 << 62
"""The smallest key of a string id."""


def id_key(value: Id) -> int:
    """The int64 key of an id (an int is its own key).

    Example::

        >>> id_key(7), id_key("img_0007") == id_key("img_0007") >= STRING_KEY_BASE
        (7, True)
    """
    if isinstance(value, str):
        digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
        return STRING_KEY_BASE + (int.from_bytes(digest, "little") % STRING_KEY_BASE)
    return int(value)


def id_keys(values: Iterable[Id] | Any) -> np.ndarray:
    """int64 keys of ids (a list, an int array, a string array or a tensor)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.int64)
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()
    return np.fromiter((id_key(v) for v in values), dtype=np.int64)


def ids_array(values: Sequence[Id]) -> np.ndarray:
    """Ids as users read them: an int64 array when every id is an int, else a string array."""
    if any(isinstance(v, str) for v in values):
        return np.array([str(v) for v in values], dtype=str)
    return np.asarray(values, dtype=np.int64).reshape(-1)
