"""The tiny open_clip ViT config the test scripts build (the same as ``tests/conftest.py``'s ``TINY_VIT``).

The scripts run as standalone processes (their folder is first on ``sys.path``), so they import it as ``tiny``,
with :func:`teardown`, which every multi-process script calls last.
"""

import torch

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def teardown() -> None:
    """Wait for every rank, then tear the gloo group down (a rank exiting while gloo threads live gets SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
