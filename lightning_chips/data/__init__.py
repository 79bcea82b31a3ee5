"""Datasets and data modules: the built-in two-domain data (later: scored subsets, WebDataset pools)."""

from lightning_chips.data.builtin import CLASSNAMES, DOMAINS, TEMPLATES, TwoDomainPairs
from lightning_chips.data.datamodule import TwoDomainDataModule, clip_normalize, resolve_tokenizer
from lightning_chips.data.sampler import ScoredSubsetSampler
from lightning_chips.data.subset import PairCollate, ScoredSubsetDataModule

__all__ = [
    "CLASSNAMES",
    "DOMAINS",
    "TEMPLATES",
    "PairCollate",
    "ScoredSubsetDataModule",
    "ScoredSubsetSampler",
    "TwoDomainDataModule",
    "TwoDomainPairs",
    "clip_normalize",
    "resolve_tokenizer",
]
