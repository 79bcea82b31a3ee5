"""Scorers by name: ``build_scorer("chips", sketch_dim=256)``."""

from __future__ import annotations

from typing import Any

from lightning_chips.scoring.base import Scorer
from lightning_chips.scoring.chips import CHIPS
from lightning_chips.scoring.compose import Chain, Intersect
from lightning_chips.scoring.influence import TRAK, Dot, TracIn
from lightning_chips.scoring.quality import ClipCov, ClipPowered, CLIPScore, NegCLIPLoss, NormSim
from lightning_chips.scoring.random import Random

__all__ = ["SCORERS", "build_scorer", "register_scorer"]

SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Register a Scorer class under its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name` class attribute to register it under.")
    SCORERS[cls.name] = cls
    return cls


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """Instantiate the scorer registered as ``name`` with keyword arguments.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    key = name.lower().replace("-", "_")
    if key not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; known scorers: {sorted(SCORERS)}.")
    return SCORERS[key](**kwargs)


for _cls in (CHIPS, Chain, ClipCov, ClipPowered, CLIPScore, Dot, Intersect, NegCLIPLoss, NormSim, Random, TRAK, TracIn):
    register_scorer(_cls)
