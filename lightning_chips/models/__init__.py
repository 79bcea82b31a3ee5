"""LightningModules for CLIP continual pre-training."""

from lightning_chips.models.open_clip_module import OpenCLIPModule
from lightning_chips.models.two_tower import TwoTowerCLIP

__all__ = ["OpenCLIPModule", "TwoTowerCLIP"]
