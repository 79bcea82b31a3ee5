"""LightningModules for CLIP continual pre-training."""

from lightning_chips.models.open_clip_module import OpenCLIPModule

__all__ = ["OpenCLIPModule"]
