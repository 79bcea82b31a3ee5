"""The tiny open_clip ViT config the test scripts build (the same as ``tests/conftest.py``'s ``TINY_VIT``).

The scripts run as standalone processes (their folder is first on ``sys.path``), so they import it as ``tiny``.
"""

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
