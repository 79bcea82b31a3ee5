"""lightning-chips: data selection for CLIP continual pre-training, as a PyTorch Lightning plugin.

Public API only; see the README and docs/ for the tour.
"""

from lightning_chips.adapters import CLIPAdapter, EndPoint, SupportsEndPoint, UnsupportedModelError, resolve_adapter
from lightning_chips.data import TwoDomainDataModule, TwoDomainPairs
from lightning_chips.models import OpenCLIPModule

__version__ = "0.1.0.dev0"

__all__ = [
    "CLIPAdapter",
    "EndPoint",
    "OpenCLIPModule",
    "SupportsEndPoint",
    "TwoDomainDataModule",
    "TwoDomainPairs",
    "UnsupportedModelError",
    "__version__",
    "resolve_adapter",
]
