"""String ids (DataComp uids, WebDataset keys) round-trip through a fit, a resume, ``score`` and ``select
--reshard``: every file a user reads holds them as given."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.data import WebDatasetDataModule, WebDatasetPairs
from lightning_chips.ids import STRING_KEY_BASE, id_key
from lightning_chips.offline import read_scores, score_pool
from lightning_chips.reshard import select_subset
from lightning_chips.scoring import CHIPS

from .conftest import TINY_VIT
from .shards import write_pool


class Named(Dataset):
    """Built-in pairs under string ids."""

    def __init__(self, n: int, **kwargs) -> None:
        self.base = TwoDomainPairs(n, **kwargs)
        self.names = [f"img_{i:04d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], "id": self.names[index]}


class Seen(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, list[str]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, list(batch["id"])))


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)


def _chips() -> CHIPS:
    return CHIPS(sketch_dim=32, bank_size=24, curvature_samples=48)


def test_keys_of_string_ids_are_stable_and_apart_from_integer_ids():
    assert id_key("img_0001") == id_key("img_0001") != id_key("img_0002")
    assert id_key("img_0001") >= STRING_KEY_BASE and id_key(12345) == 12345


def test_string_ids_round_trip_through_a_fit_and_a_resume(tmp_path):
    pool = Named(96, noise_fraction=0.2, target_fraction=0.3)

    def run(directory: Path, ckpt_path=None) -> Seen:
        seen = Seen()
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        callback = DataSelectionCallback(_chips(), fraction=0.25, every_n_epochs=1, save_dir=str(directory / "r"),
                                         progress=False)  # fmt: skip
        data = ScoredSubsetDataModule(pool, Named(12, target_fraction=1.0, split="val"), batch_size=8,
                                      steps_per_round=3, eval_batch_size=32)  # fmt: skip
        trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback, checkpoint, seen])  # fmt: skip
        trainer.fit(_module(), datamodule=data, ckpt_path=ckpt_path)
        return seen

    full = run(tmp_path / "full")
    for r in range(3):
        with np.load(tmp_path / "full" / "r" / f"round_{r:04d}.npz") as f:
            assert f["ids"].tolist() == sorted(pool.names)  # every id as given
            chosen = set(f["ids"][f["selected"]].tolist())
        assert len(chosen) == 24
        assert all(set(ids) <= chosen for epoch, ids in full.steps if epoch == r)  # trained on the selection
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "epoch=0.ckpt"))
    assert resumed.steps == [(e, ids) for e, ids in full.steps if e >= 1]
    for r in (2,):  # round 1 ran before the epoch-0 checkpoint; the resumed fit runs round 2
        with np.load(tmp_path / "full" / "r" / f"round_{r:04d}.npz") as a:
            with np.load(tmp_path / "resumed" / "r" / f"round_{r:04d}.npz") as b:
                assert a["ids"].tolist() == b["ids"].tolist() and (a["selected"] == b["selected"]).all()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("strings")
    valid = write_pool(root / "pool", num_pairs=30, per_shard=8, corrupt_image=4, string_uids=True)
    write_pool(root / "target", num_pairs=8, per_shard=8, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target", string_uids=True)  # fmt: skip
    return root, valid


def test_string_uids_round_trip_through_score_select_and_reshard(shards, tmp_path):
    root, valid = shards
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    path = score_pool(_module(), _chips(), str(root / "pool"), str(tmp_path / "scores"), target=str(root / "target"),
                      batch_size=8, num_workers=0, pool_sample=None, trainer=trainer)  # fmt: skip
    scores = read_scores(path)
    assert scores["ids"].tolist() == sorted(valid)  # strings, as in the shards' json
    chosen = select_subset(str(tmp_path / "scores"), str(tmp_path / "subset.npy"), count=10,
                           reshard=str(tmp_path / "subset" / "%04d.tar"))  # fmt: skip
    top = np.argsort(-scores["scores"], kind="stable")[:10]
    assert np.load(tmp_path / "subset.npy").tolist() == sorted(scores["ids"][top].tolist()) == chosen.tolist()
    copied = [p["id"] for p in WebDatasetPairs(str(tmp_path / "subset"), image_size=32)]
    assert sorted(copied) == chosen.tolist()


def test_a_streaming_round_names_string_uids_in_its_round_file(shards, tmp_path):
    root, valid = shards
    callback = DataSelectionCallback(_chips(), fraction=0.5, save_dir=str(tmp_path / "r"), progress=False)
    data = WebDatasetDataModule(str(root / "pool"), str(root / "target"), batch_size=8, steps_per_round=1,
                                num_workers=0, eval_batch_size=8)  # fmt: skip
    pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[callback]).fit(_module(), datamodule=data)  # fmt: skip
    with np.load(tmp_path / "r" / "round_0000.npz") as f:
        assert f["ids"].tolist() == sorted(valid)
        assert f["bad_ids"].tolist() == ["u-1000000000004"]  # the undecodable image, named by its uid
        chosen = f["ids"][f["selected"]]
    assert torch.equal(torch.as_tensor(np.sort(callback.selection.ids)),
                       torch.as_tensor(np.sort([id_key(u) for u in chosen])))  # fmt: skip
