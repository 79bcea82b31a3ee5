"""lightning-chips: data selection for CLIP continual pre-training, as a PyTorch Lightning plugin.

Public API only; see the README and docs/ for the tour.
"""

from lightning_chips.adapters import CLIPAdapter, EndPoint, SupportsEndPoint, UnsupportedModelError, resolve_adapter
from lightning_chips.callback import DataSelectionCallback
from lightning_chips.data import ScoredSubsetDataModule, TwoDomainDataModule, TwoDomainPairs, WebDatasetDataModule
from lightning_chips.evaluation import BuiltinZeroShotTask, RetrievalTask, ZeroShotEvaluation, ZeroShotTask
from lightning_chips.metrics import RetrievalRecallAtK, ZeroShotAccuracy, build_zero_shot_classifier
from lightning_chips.models import OpenCLIPModule
from lightning_chips.scoring import CHIPS, Random, Scorer, build_scorer
from lightning_chips.selection import Selection

__version__ = "0.1.0.dev0"

__all__ = [
    "CHIPS",
    "CLIPAdapter",
    "DataSelectionCallback",
    "Random",
    "ScoredSubsetDataModule",
    "Scorer",
    "Selection",
    "build_scorer",
    "build_zero_shot_classifier",
    "BuiltinZeroShotTask",
    "RetrievalRecallAtK",
    "RetrievalTask",
    "ZeroShotAccuracy",
    "ZeroShotEvaluation",
    "ZeroShotTask",
    "EndPoint",
    "OpenCLIPModule",
    "SupportsEndPoint",
    "TwoDomainDataModule",
    "TwoDomainPairs",
    "WebDatasetDataModule",
    "UnsupportedModelError",
    "__version__",
    "resolve_adapter",
]
