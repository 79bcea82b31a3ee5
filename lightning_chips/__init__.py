"""lightning-chips: data selection for CLIP continual pre-training, as a PyTorch Lightning plugin.

Public API only; see the README and docs/ for the tour. Names are imported on first use (the package itself imports
nothing heavy). Grouped as: the Lightning pieces (callback, data modules,
CPT module, evaluation), the scorers (every registered one, the composites, the registry), selection, and the
model contract (adapters and the end point).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_chips.adapters import CLIPAdapter, SupportsEndPoint, UnsupportedModelError, resolve_adapter
    from lightning_chips.callback import DataSelectionCallback
    from lightning_chips.data import ScoredSubsetDataModule, TwoDomainDataModule, TwoDomainPairs, WebDatasetDataModule
    from lightning_chips.endpoint import EndPoint
    from lightning_chips.evaluation import BuiltinZeroShotTask, RetrievalTask, ZeroShotEvaluation, ZeroShotTask
    from lightning_chips.features import PairFeatures
    from lightning_chips.functional.chips import ChipsArguments
    from lightning_chips.metrics import RetrievalRecallAtK, ZeroShotAccuracy, build_zero_shot_classifier
    from lightning_chips.models import OpenCLIPModule, TwoTowerCLIP
    from lightning_chips.offline import score_pool
    from lightning_chips.report import build_report
    from lightning_chips.rescore import CandidateRescore
    from lightning_chips.reshard import select_subset
    from lightning_chips.scoring import (
        CHIPS,
        ROBUST_COMPONENTS,
        SCORERS,
        TRAK,
        Chain,
        ClipCov,
        ClipPowered,
        CLIPScore,
        Dot,
        Intersect,
        NegCLIPLoss,
        NormSim,
        Random,
        RoundContext,
        Scorer,
        TracIn,
        build_scorer,
        register_scorer,
    )
    from lightning_chips.selection import Selection, select

_MODULES = {
    "lightning_chips.adapters": ("CLIPAdapter", "SupportsEndPoint", "UnsupportedModelError", "resolve_adapter"),
    "lightning_chips.callback": ("DataSelectionCallback",),
    "lightning_chips.data": ("ScoredSubsetDataModule", "TwoDomainDataModule", "TwoDomainPairs", "WebDatasetDataModule"),
    "lightning_chips.endpoint": ("EndPoint",),
    "lightning_chips.evaluation": ("BuiltinZeroShotTask", "RetrievalTask", "ZeroShotEvaluation", "ZeroShotTask"),
    "lightning_chips.features": ("PairFeatures",),
    "lightning_chips.functional.chips": ("ChipsArguments",),
    "lightning_chips.metrics": ("RetrievalRecallAtK", "ZeroShotAccuracy", "build_zero_shot_classifier"),
    "lightning_chips.models": ("OpenCLIPModule", "TwoTowerCLIP"),
    "lightning_chips.offline": ("score_pool",),
    "lightning_chips.report": ("build_report",),
    "lightning_chips.rescore": ("CandidateRescore",),
    "lightning_chips.reshard": ("select_subset",),
    "lightning_chips.scoring": (
        "CHIPS", "ROBUST_COMPONENTS", "SCORERS", "TRAK", "Chain", "ClipCov", "ClipPowered", "CLIPScore", "Dot",
        "Intersect", "NegCLIPLoss", "NormSim", "Random", "RoundContext", "Scorer", "TracIn", "build_scorer",
        "register_scorer",
    ),
    "lightning_chips.selection": ("Selection", "select"),
}  # fmt: skip
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """The public names are imported on first use, so ``lightning-chips --help`` and light imports stay fast."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_chips' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0.dev0"

__all__ = [
    # Lightning pieces
    "DataSelectionCallback",
    "ScoredSubsetDataModule",
    "WebDatasetDataModule",
    "TwoDomainDataModule",
    "TwoDomainPairs",
    "OpenCLIPModule",
    "TwoTowerCLIP",
    "ZeroShotEvaluation",
    "ZeroShotTask",
    "BuiltinZeroShotTask",
    "RetrievalTask",
    "ZeroShotAccuracy",
    "RetrievalRecallAtK",
    "build_zero_shot_classifier",
    # scorers
    "CHIPS",
    "ChipsArguments",
    "ROBUST_COMPONENTS",
    "Random",
    "CLIPScore",
    "NegCLIPLoss",
    "NormSim",
    "ClipCov",
    "ClipPowered",
    "Dot",
    "TracIn",
    "TRAK",
    "Chain",
    "Intersect",
    "Scorer",
    "RoundContext",
    "SCORERS",
    "build_scorer",
    "register_scorer",
    # selection
    "Selection",
    "select",
    "CandidateRescore",
    # offline scoring, selection and reports (what `lightning-chips score` / `select` / `report` run)
    "score_pool",
    "select_subset",
    "build_report",
    # the model contract
    "CLIPAdapter",
    "SupportsEndPoint",
    "UnsupportedModelError",
    "resolve_adapter",
    "EndPoint",
    "PairFeatures",
    "__version__",
]
