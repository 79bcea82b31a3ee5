"""Pools from other libraries in a selection fit: a Hugging Face ``datasets.Dataset`` of PIL images and a litdata
``StreamingDataset`` written by ``litdata.optimize``, each with a resume that selects as the uninterrupted fit."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.gallery import gallery_path

from .conftest import TINY_VIT

pytestmark = pytest.mark.slow

POOL = 48
STEPS = 2  # steps per round
EPOCHS = 3  # rounds at step 0 and after epochs 0 and 1


def _items(n: int, **kwargs) -> list[dict]:
    """TwoDomainPairs as plain items with a PIL image (uint8 RGB), the caption, the id and the domain."""
    from PIL import Image

    pairs = TwoDomainPairs(n, **kwargs)
    out = []
    for i in range(n):
        item = pairs[i]
        pixels = (item["image"].permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        out.append({"image": Image.fromarray(pixels), "text": item["text"], "id": int(item["id"]),
                    "domain": int(item["domain"])})  # fmt: skip
    return out


class Record(pl.Callback):
    """Every training batch's ids, by epoch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, batch["id"].tolist()))


def _fit(directory: Path, pool, target, ckpt_path: str | None = None) -> tuple[Record, DataSelectionCallback]:
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
    # A deterministic transform: the model's default training augmentation (random resized crops) draws from the
    # global RNG, which a resume does not restore, so a resumed PIL pool would train on other crops.
    transform = T.Compose([T.Resize(32), T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    data = ScoredSubsetDataModule(pool, target, batch_size=8, steps_per_round=STEPS, eval_batch_size=48,
                                  transform=transform)  # fmt: skip
    callback = DataSelectionCallback("normsim", fraction=0.25,
                                     every_n_epochs=1, save_dir=str(directory / "rounds"), group_by=["domain"],
                                     gallery=2, thumbnail_size=16)  # fmt: skip
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, callbacks=[callback, record, checkpoint],
               logger=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=directory).fit(module, datamodule=data, ckpt_path=ckpt_path)  # fmt: skip
    return record, callback


def _round(directory: Path, r: int) -> dict[str, np.ndarray]:
    f = np.load(directory / "rounds" / f"round_{r:04d}.npz")
    return {key: f[key] for key in ("ids", "scores", "selected")}


def _check_fit_and_resume(tmp_path: Path, pool, target) -> None:
    full, callback = _fit(tmp_path / "full", pool, target)
    assert len(callback.history) == EPOCHS and len(full.steps) == EPOCHS * STEPS
    ids = np.arange(POOL)
    for r in range(EPOCHS):
        f = _round(tmp_path / "full", r)
        assert np.array_equal(np.sort(f["ids"]), ids) and f["selected"].sum() == round(0.25 * POOL)
        drawn = {i for e, batch in full.steps if e == r for i in batch}
        assert drawn <= set(f["ids"][f["selected"]].tolist())  # epoch r trained on round r's selection
        gallery = np.load(gallery_path(tmp_path / "full" / "rounds" / f"round_{r:04d}.npz"))
        assert len(gallery["missing_ids"]) == 0 and gallery["thumbnails"].shape[1:] == (16, 16, 3)
    domains = [pool[i]["domain"] for i in range(len(pool))]  # group_by reads the pool's own "domain" column
    assert callback.history[0]["group/domain=1/pool"] == pytest.approx(np.mean(domains))
    # Resume after epoch 0 (round 1 done, in the checkpoint): epoch 1 and round 2 as in the uninterrupted fit.
    resumed, resumed_callback = _fit(tmp_path / "resume", pool, target, ckpt_path=str(tmp_path / "full/epoch=0.ckpt"))
    assert resumed.steps == [(e, batch) for e, batch in full.steps if e >= 1]
    again, before = _round(tmp_path / "resume", 2), _round(tmp_path / "full", 2)
    assert np.array_equal(again["ids"], before["ids"]) and np.array_equal(again["selected"], before["selected"])
    torch.testing.assert_close(torch.from_numpy(again["scores"]), torch.from_numpy(before["scores"]))
    assert resumed_callback.history[-1] == pytest.approx(callback.history[-1], nan_ok=True)


def test_a_hugging_face_dataset_of_pil_images_is_a_pool_and_target_and_resumes(tmp_path):
    datasets = pytest.importorskip("datasets")

    def to_hf(items: list[dict]):
        columns = {key: [item[key] for item in items] for key in items[0]}
        return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())

    pool = to_hf(_items(POOL, noise_fraction=0.2, target_fraction=0.3))
    target = to_hf(_items(16, target_fraction=1.0, split="val"))
    from PIL import Image

    assert isinstance(pool[0]["image"], Image.Image)  # the Image feature decodes to PIL on access
    _check_fit_and_resume(tmp_path, pool, target)


def _litdata_item(item: dict) -> dict:
    return item  # litdata.optimize serializes the PIL image, the str and the ints of each dict


def test_a_litdata_streaming_dataset_is_a_pool_and_resumes(tmp_path):
    litdata = pytest.importorskip("litdata")

    litdata.optimize(fn=_litdata_item, inputs=_items(POOL, noise_fraction=0.2, target_fraction=0.3),
                     output_dir=str(tmp_path / "optimized"), chunk_bytes="64KB", num_workers=1)  # fmt: skip
    assert len(list((tmp_path / "optimized").glob("*.bin"))) > 1  # several chunks
    pool = litdata.StreamingDataset(str(tmp_path / "optimized"))
    assert len(pool) == POOL
    target = TwoDomainPairs(16, target_fraction=1.0, split="val")
    _check_fit_and_resume(tmp_path, pool, target)
