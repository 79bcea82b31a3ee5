"""Continual pre-training on the live selection of a WebDataset pool (WebDatasetDataModule + the callback)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_chips import DataSelectionCallback, OpenCLIPModule
from lightning_chips.data.stream import SelectedStream, WebDatasetDataModule, _Live
from lightning_chips.data.webdataset import WebDatasetPairs
from lightning_chips.scoring import CHIPS
from lightning_chips.selection import Selection

from .conftest import TINY_VIT
from .shards import write_pool

SCRIPT = Path(__file__).parent / "scripts" / "ddp_stream.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    valid = write_pool(root / "pool", num_pairs=64, per_shard=8, corrupt_image=9)
    write_pool(root / "target", num_pairs=12, per_shard=12, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root, valid


def _stream(root: Path, ids, *, epoch=0, batches=5, batch_size=4, rank=0, world=1, buffer=6) -> SelectedStream:
    pool = WebDatasetPairs(str(root / "pool"), image_size=32).bind(rank, world)
    selection = None if ids is None else Selection(np.asarray(ids), np.asarray(ids), None)
    return SelectedStream(pool, _Live(lambda: selection, lambda: epoch), batches=batches, batch_size=batch_size,
                          shuffle_buffer=buffer)  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_gives_exactly_the_round_length_from_the_selection(shards, workers):
    root, valid = shards
    chosen = sorted(valid)[::5]  # 13 of 63 valid pairs, fewer than one round: the stream cycles
    loader = torch.utils.data.DataLoader(_stream(root, chosen), batch_size=4, num_workers=workers,
                                         collate_fn=lambda items: [x["id"] for x in items])  # fmt: skip
    batches = list(loader)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    drawn = [i for b in batches for i in b]
    assert set(drawn) <= set(chosen)
    again = [i for b in loader for i in b]
    assert again == drawn  # same seed and epoch, same stream
    other_epoch = [x["id"] for x in _stream(root, chosen, epoch=1)]
    assert other_epoch != drawn and set(other_epoch) <= set(chosen)


def test_stream_without_selected_pairs_says_why(shards):
    root, _ = shards
    with pytest.raises(RuntimeError, match="holds a selected pair"):
        list(_stream(root, [7]))


def test_ranks_stream_equal_lengths_from_their_own_shards(shards):
    root, valid = shards
    chosen = sorted(valid)[:40]  # the first five shards: rank 1's shards hold fewer selected pairs
    per_rank = [[x["id"] for x in _stream(root, chosen, rank=r, world=2)] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 20
    urls = WebDatasetPairs(str(root / "pool")).urls
    for rank, ids in enumerate(per_rank):
        own = {p["id"] for u in urls[rank::2] for p in WebDatasetPairs(u, image_size=32)}
        assert set(ids) <= own & set(chosen)


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}
        self.selections: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.selections[trainer.current_epoch] = trainer.datamodule.selection.ids.tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).extend(batch["id"].tolist())


@pytest.mark.parametrize("workers", [0, 2])
def test_fit_trains_on_each_rounds_selection_of_the_shards(shards, tmp_path, workers):
    root, valid = shards
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)
    data = WebDatasetDataModule(str(root / "pool"), str(root / "target"), batch_size=8, steps_per_round=3,
                                num_workers=workers, shuffle_buffer=16)  # fmt: skip
    record = _Record()
    chips = CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64)
    callback = DataSelectionCallback(chips, fraction=0.25, every_n_epochs=1, pool_sample=24, save_dir=str(tmp_path),
                                     progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, callbacks=[callback, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 9
    for epoch in range(3):
        selection = record.selections[epoch]
        assert len(selection) == round(0.25 * len(valid))  # every valid pair was scored, the bad one skipped
        assert len(record.batches[epoch]) == 24 and set(record.batches[epoch]) <= set(selection)
    rounds = sorted(tmp_path.glob("round_*.npz"))
    assert len(rounds) == 3
    scored = np.load(rounds[0])
    assert scored["ids"].tolist() == sorted(valid)
    assert record.selections[0] != record.selections[2]  # the model moved, the selection followed


@pytest.mark.ddp
def test_ddp_ranks_agree_and_draw_equal_batches_from_the_selection(shards, tmp_path):
    root, valid = shards
    result = subprocess.run([sys.executable, str(SCRIPT), str(root), str(tmp_path)], capture_output=True, text=True,
                            timeout=400, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        assert ranks[0]["selections"][epoch] == ranks[1]["selections"][epoch]
        selection = set(ranks[0]["selections"][epoch])
        assert len(selection) == round(0.25 * len(valid))
        a, b = ranks[0]["batches"][epoch], ranks[1]["batches"][epoch]
        assert len(a) == len(b) == 3 * 8 and set(a) | set(b) <= selection


def test_datamodule_validates_eagerly():
    with pytest.raises(ValueError, match="batch_size"):
        WebDatasetDataModule("x", batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        WebDatasetDataModule("x", num_workers=-1)


def _round_zero_scores(root: Path, tmp_path: Path, *, callback_seed: int, data_seed: int) -> np.ndarray:
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)
    data = WebDatasetDataModule(str(root / "pool"), str(root / "target"), batch_size=8, steps_per_round=1,
                                num_workers=0, shuffle_buffer=16, seed=data_seed)  # fmt: skip
    chips = CHIPS(sketch_dim=64, bank_size=16, curvature_samples=16)
    save = tmp_path / f"c{callback_seed}-d{data_seed}"
    callback = DataSelectionCallback(chips, fraction=0.25, every_n_epochs=1, pool_sample=16, seed=callback_seed,
                                     save_dir=str(save), progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert callback.state_dict()["seed"] == callback_seed  # checkpointed with the rounds
    with np.load(save / "round_0000.npz") as f:
        return f["scores"]


def test_the_callbacks_seed_draws_the_pool_sample_of_a_streaming_pool(shards, tmp_path):
    """The pool sample (16 of 63 pairs here, so the bank and curvature) follows DataSelectionCallback(seed=...), as
    for map-style pools, whatever the data module's own seed (which orders the training stream)."""
    root, _ = shards
    base = _round_zero_scores(root, tmp_path, callback_seed=3, data_seed=0)
    np.testing.assert_array_equal(_round_zero_scores(root, tmp_path, callback_seed=3, data_seed=5), base)
    assert not np.allclose(_round_zero_scores(root, tmp_path, callback_seed=4, data_seed=0), base)


def test_a_checkpoint_with_another_seed_warns_and_keeps_the_callbacks_seed():
    callback = DataSelectionCallback(CHIPS(), fraction=0.3, every_n_epochs=1, seed=7)
    state = DataSelectionCallback(CHIPS(), fraction=0.3, every_n_epochs=1, seed=1).state_dict()
    with pytest.warns(UserWarning, match="checkpoint's selection seed is 1, this callback's is 7"):
        callback.load_state_dict(state)
    assert callback.seed == 7 and callback.state_dict()["seed"] == 7
