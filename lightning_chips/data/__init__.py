"""Datasets and data modules: the built-in two-domain data (later: scored subsets, WebDataset pools)."""

from lightning_chips.data.builtin import CLASSNAMES, DOMAINS, TEMPLATES, TwoDomainPairs
from lightning_chips.data.datamodule import TwoDomainDataModule, clip_normalize, resolve_tokenizer

__all__ = [
    "CLASSNAMES",
    "DOMAINS",
    "TEMPLATES",
    "TwoDomainDataModule",
    "TwoDomainPairs",
    "clip_normalize",
    "resolve_tokenizer",
]
