"""Argument checks and small array helpers shared by the built-in and the real datasets."""

from __future__ import annotations

import re
from numbers import Integral, Real
from typing import Any

import numpy as np

__all__ = ["check_fraction", "check_int", "fix_articles", "readonly"]


def check_int(name: str, value: Any, low: int, high: int | None, hint: str) -> int:
    """``value`` as an int in ``[low, high]`` (``high=None``: no upper bound), else a ``ValueError`` with ``hint``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} of type {type(value).__name__} ({hint}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be an integer {bound}, got {value} ({hint}).")
    return value


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (e.g. {name}=0.2), got {value!r}.")
    return float(value)


def readonly(array: np.ndarray) -> np.ndarray:
    """``array``, made read-only (metadata arrays a dataset exposes must not be edited in place)."""
    array.flags.writeable = False
    return array


def fix_articles(text: str) -> str:
    """Turn ``"a orange"`` into ``"an orange"``."""
    return ARTICLE_RE.sub(r"\1n ", text)


ARTICLE_RE = re.compile(r"\b([aA]) (?=[aeiouAEIOU])")
