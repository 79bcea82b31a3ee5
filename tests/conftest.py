"""Shared fixtures: tiny open_clip configs (DATA.md) that build in milliseconds and need no download."""

from __future__ import annotations

import copy

import pytest
import torch

TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": TINY_TEXT,
}
TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": TINY_TEXT,
}


@pytest.fixture
def tiny_vit_config() -> dict:
    return copy.deepcopy(TINY_VIT)


@pytest.fixture
def tiny_resnet_config() -> dict:
    return copy.deepcopy(TINY_RESNET)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
