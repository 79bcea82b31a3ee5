"""Scorers (stateful, streaming) wrapping :mod:`lightning_chips.functional`, their settings (one frozen
``...Arguments`` dataclass per scorer; CHIPS uses :class:`~lightning_chips.functional.chips.ChipsArguments`), and the
registry by name."""

from lightning_chips.scoring.base import RoundContext, Scorer, check_prepare_inputs
from lightning_chips.scoring.chips import CHIPS, ROBUST_COMPONENTS
from lightning_chips.scoring.compose import Chain, ChainArguments, Intersect, IntersectArguments
from lightning_chips.scoring.influence import TRAK, Dot, InfluenceArguments, TracIn
from lightning_chips.scoring.quality import (
    ClipCov,
    ClipCovArguments,
    ClipPowered,
    ClipPoweredArguments,
    CLIPScore,
    CLIPScoreArguments,
    NegCLIPLoss,
    NegCLIPLossArguments,
    NormSim,
    NormSimArguments,
)
from lightning_chips.scoring.random import Random, RandomArguments
from lightning_chips.scoring.registry import SCORERS, build_scorer, register_scorer

__all__ = [
    "CHIPS",
    "CLIPScore",
    "CLIPScoreArguments",
    "Chain",
    "ChainArguments",
    "ClipCov",
    "ClipCovArguments",
    "ClipPowered",
    "ClipPoweredArguments",
    "Dot",
    "InfluenceArguments",
    "Intersect",
    "IntersectArguments",
    "NegCLIPLoss",
    "NegCLIPLossArguments",
    "NormSim",
    "NormSimArguments",
    "ROBUST_COMPONENTS",
    "SCORERS",
    "Random",
    "RandomArguments",
    "RoundContext",
    "Scorer",
    "TRAK",
    "TracIn",
    "build_scorer",
    "check_prepare_inputs",
    "register_scorer",
]
