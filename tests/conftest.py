"""Shared fixtures: tiny open_clip configs (DATA.md) that build in milliseconds and need no download."""

from __future__ import annotations

import copy
import os

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


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker (and the DDP processes its tests start) gets its share of the cores: two
    workers on two cores with torch's default of one thread per core ran up to 4x slower than one worker alone."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // int(workers)))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


# The longest test files (measured with `pytest -n 2 --dist loadfile --durations=40`, 2026-12-06), longest first.
# pytest-xdist's loadfile hands files to the workers in collection order: started first, they run beside the many
# short files instead of alone at the end of the run. Only the order changes, never which tests run.
LONGEST_FIRST = (
    "test_quality.py",
    "test_selection_quality.py",
    "test_ddp.py",
    "test_faults_callback.py",
    "test_offline.py",
    "test_tracin_ddp.py",
    "test_stream.py",
    "test_entry_points.py",
    "test_faults.py",
    "test_offline_integrity.py",
    "test_siglip_training.py",
    "test_evaluation.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole and in order
