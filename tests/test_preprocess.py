"""open_clip-native inputs: PIL, uint8 and already-preprocessed images reach the model as open_clip's own
preprocess makes them; the tokenizer is the model's or the one passed, never a silent guess."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule
from lightning_chips.data import ImageInput, clip_normalize, resolve_tokenizer

from .conftest import TINY_VIT


def _pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)) for i in range(n)]


class Pairs(Dataset):
    def __init__(self, images, captions=None) -> None:
        self.images = images
        self.captions = captions or [f"a picture number {i}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "text": self.captions[index], "id": index}


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)


def _open_clip_preprocess(module: OpenCLIPModule):
    """The evaluation preprocess open_clip.create_model_and_transforms builds for this model."""
    cfg = open_clip.get_model_preprocess_cfg(module.model)
    return open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
    )  # fmt: skip


class _Scored(pl.Callback):
    """The pixels of the data module's scoring batches, by id."""

    def __init__(self) -> None:
        self.pixels: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        for batch, _ in trainer.datamodule.scoring_batches(0, 1):
            self.pixels.update(zip(batch["id"].tolist(), batch["image"], strict=True))


def _scored_pixels(pool: Dataset) -> dict[int, torch.Tensor]:
    scored = _Scored()
    data = ScoredSubsetDataModule(pool, batch_size=4, steps_per_round=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[scored, DataSelectionCallback("random", fraction=0.5, save_dir="")])  # fmt: skip
    trainer.fit(_module(), datamodule=data)
    return scored.pixels


def test_pil_uint8_and_open_clip_preprocessed_items_reach_the_model_as_open_clips_preprocess_makes_them():
    pictures = _pictures(6)
    preprocess = _open_clip_preprocess(_module())
    expected = [preprocess(p) for p in pictures]
    from_pil = _scored_pixels(Pairs(pictures))
    uint8 = [torch.from_numpy(np.asarray(p)).permute(2, 0, 1).contiguous() for p in pictures]
    from_uint8 = _scored_pixels(Pairs(uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_preprocessed = _scored_pixels(Pairs(expected))
    assert any("already normalised" in str(w.message) for w in caught)  # and it says so
    for i, want in enumerate(expected):
        torch.testing.assert_close(from_pil[i], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(from_uint8[i], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(from_preprocessed[i], want, rtol=0, atol=1e-6)  # never normalised twice


def test_float_images_in_0_1_are_normalised_once_and_normalised_ones_pass_through():
    to_input = clip_normalize()
    image = torch.rand(3, 8, 8)
    once = to_input(image)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    torch.testing.assert_close(once, (image - mean) / std)
    with pytest.warns(UserWarning, match="already normalised"):
        again = to_input(once)
    assert torch.equal(again, once)
    assert torch.equal(ImageInput(normalize=False)(image), image)
    with pytest.raises(TypeError, match="no image transform"):
        ImageInput(None)(_pictures(1)[0])


def test_a_model_without_a_tokenizer_is_an_error_saying_how_to_pass_one():
    module = torch.nn.Module()
    with pytest.raises(ValueError, match=r"has no tokenizer \(no get_tokenizer\(\).*Pass `tokenizer=`"):
        resolve_tokenizer(None, None, module)
    given = open_clip.tokenizer.SimpleTokenizer(context_length=20)
    assert resolve_tokenizer(given, None, module) is given  # a callable is used as it is
    assert resolve_tokenizer("ViT-B-32", 20, module)(["a cat"]).shape == (1, 20)
    assert resolve_tokenizer(None, 16, None)(["a cat"]).shape == (1, 16)  # no model attached: open_clip's default
