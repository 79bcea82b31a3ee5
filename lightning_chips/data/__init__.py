"""Datasets and data modules: the built-in two-domain data, scored subsets of map-style pools, WebDataset pools."""

from lightning_chips.data.builtin import CLASSNAMES, DOMAINS, TEMPLATES, TwoDomainPairs
from lightning_chips.data.checks import BadSample, CheckedPairs, ShardReport, SkippedSample
from lightning_chips.data.collate import PairCollate
from lightning_chips.data.datamodule import TwoDomainDataModule
from lightning_chips.data.folder import ImageCaptionFolder
from lightning_chips.data.preprocess import ImageInput, clip_normalize, model_image_input, resolve_tokenizer
from lightning_chips.data.sampler import ScoredSubsetSampler
from lightning_chips.data.stream import SelectedStream, WebDatasetDataModule
from lightning_chips.data.subset import ScoredSubsetDataModule
from lightning_chips.data.webdataset import WebDatasetPairs, expand_shards

__all__ = [
    "BadSample",
    "CLASSNAMES",
    "CheckedPairs",
    "DOMAINS",
    "TEMPLATES",
    "ImageCaptionFolder",
    "ImageInput",
    "SelectedStream",
    "ShardReport",
    "SkippedSample",
    "WebDatasetDataModule",
    "WebDatasetPairs",
    "expand_shards",
    "PairCollate",
    "ScoredSubsetDataModule",
    "ScoredSubsetSampler",
    "TwoDomainDataModule",
    "TwoDomainPairs",
    "clip_normalize",
    "model_image_input",
    "resolve_tokenizer",
]
