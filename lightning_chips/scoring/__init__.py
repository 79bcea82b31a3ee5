"""Scorers (stateful, streaming) wrapping :mod:`lightning_chips.functional`, and the registry by name."""

from lightning_chips.scoring.base import RoundContext, Scorer, check_prepare_inputs
from lightning_chips.scoring.chips import CHIPS, ROBUST_COMPONENTS
from lightning_chips.scoring.compose import Chain, Intersect
from lightning_chips.scoring.influence import TRAK, Dot, TracIn
from lightning_chips.scoring.quality import ClipCov, ClipPowered, CLIPScore, NegCLIPLoss, NormSim
from lightning_chips.scoring.random import Random
from lightning_chips.scoring.registry import SCORERS, build_scorer, register_scorer

__all__ = [
    "CHIPS",
    "CLIPScore",
    "Chain",
    "ClipCov",
    "ClipPowered",
    "Dot",
    "Intersect",
    "NegCLIPLoss",
    "NormSim",
    "ROBUST_COMPONENTS",
    "SCORERS",
    "Random",
    "RoundContext",
    "Scorer",
    "TRAK",
    "TracIn",
    "build_scorer",
    "check_prepare_inputs",
    "register_scorer",
]
