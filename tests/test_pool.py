"""The SelectablePool contract (lightning_chips.data.pool): what a round reads, for map-style and shard pools, and
a data module of one's own that implements it."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_chips import DataSelectionCallback, OpenCLIPModule, TwoDomainPairs
from lightning_chips.data import PairCollate, ScoredSubsetDataModule, SkippedSample, WebDatasetPairs
from lightning_chips.data.pool import SHARD_STRIDE, MapPool, PairSource, SelectablePool, ShardPool
from lightning_chips.gallery import gallery_path, pick_gallery
from lightning_chips.scoring import CHIPS

from .conftest import TINY_VIT
from .shards import write_pool


def _ids(items) -> list[int]:
    return [i for batch, _ in items if batch is not None for i in batch["id"].tolist()]


def _collate() -> PairCollate:
    import open_clip

    return PairCollate(open_clip.tokenizer.SimpleTokenizer(context_length=16))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_map_pool_parts_of_every_rank_make_the_world_one_sample_and_pool(world):
    pool = TwoDomainPairs(50)
    maps = MapPool(pool, None, _collate(), batch_size=7)
    sample = sorted(_ids(maps.pool_sample_batches(20, 3, 5, 0, 1)))
    assert len(sample) == 20 and len(set(sample)) == 20
    parts = [_ids(maps.pool_sample_batches(20, 3, 5, r, world)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == sample
    assert sample != sorted(_ids(maps.pool_sample_batches(20, 4, 5, 0, 1)))  # the round draws anew
    shares = [_ids(maps.scoring_batches(r, world)) for r in range(world)]
    assert [i for s in shares for i in s] == pool.ids.tolist()  # contiguous shares in dataset order
    for batch, _ in maps.scoring_batches(0, world):
        assert batch["id"].tolist() == pool.ids[batch["index"].numpy()].tolist()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_pool_parts_of_every_rank_make_the_world_one_sample_and_pool(tmp_path, world):
    valid = write_pool(tmp_path / "pool", num_pairs=40, per_shard=6, corrupt_image=8)
    shards = ShardPool(WebDatasetPairs(str(tmp_path / "pool"), image_size=16), None, _collate(), batch_size=4)
    sample = _ids(shards.pool_sample_batches(14, 0, 1, 0, 1))
    parts = [_ids(shards.pool_sample_batches(14, 0, 1, r, world)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == sorted(sample) and len(sample) == 14
    scored, skipped = [], []
    for r in range(world):
        for batch, found in shards.scoring_batches(r, world):
            skipped += found
            if batch is not None:
                scored += batch["id"].tolist()
                order = batch["order"]
                assert ((order // SHARD_STRIDE) < len(shards.pairs.urls)).all()
    assert sorted(scored) == sorted(valid)
    assert [(s.id, s.key, s.kind) for s in skipped] == [(10**12 + 8, "s000008", "pair")]
    assert skipped[0].shard.endswith("pool-000001.tar") and skipped[0].reason.startswith("undecodable image")


def test_the_data_modules_are_selectable_pools_and_a_plain_one_is_refused(tmp_path):
    assert isinstance(ScoredSubsetDataModule(TwoDomainPairs(8)), SelectablePool)
    plain = pl.LightningDataModule.from_datasets(train_dataset=TwoDomainPairs(8), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         callbacks=[DataSelectionCallback("random")], enable_progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"SelectablePool.*got LightningDataModule"):
        trainer.fit(_module(), datamodule=plain)


class OwnPool(pl.LightningDataModule):
    """A data module of one's own: trains on the selected pairs through its own loader, and hands the round its
    pool through MapPool (no lightning_chips data module involved)."""

    def __init__(self, pool, target) -> None:
        super().__init__()
        self.pool, self.target, self.selection = pool, target, None

    def _pool(self) -> MapPool:
        return MapPool(self.pool, self.target, _collate(), batch_size=16)

    def pool_size(self) -> int:
        return len(self.pool)

    def target_batches(self, target, rank, world):
        return self._pool().target_batches(target, rank, world)

    def pool_sample_batches(self, size, round, seed, rank, world):
        return self._pool().pool_sample_batches(size, round, seed, rank, world)

    def scoring_batches(self, rank, world):
        return self._pool().scoring_batches(rank, world)

    def train_dataloader(self):
        # Lightning builds the training loader before round 0 runs: read the selection when an epoch starts
        return DataLoader(self.pool, batch_size=8, sampler=_SelectedIndices(self), collate_fn=_collate())


class _SelectedIndices(torch.utils.data.Sampler):
    def __init__(self, data: OwnPool) -> None:
        self.data = data

    def _indices(self) -> list[int]:
        selection = self.data.selection
        return list(range(len(self.data.pool))) if selection is None else selection.indices.tolist()

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)


class _Seen(pl.Callback):
    def __init__(self) -> None:
        self.ids: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids |= set(batch["id"].tolist())


def test_a_data_module_of_ones_own_implementing_the_contract_is_selected_from(tmp_path):
    pool = TwoDomainPairs(60, noise_fraction=0.2, target_fraction=0.3)
    data = OwnPool(pool, TwoDomainPairs(12, target_fraction=1.0, split="val"))
    assert isinstance(data, SelectablePool)
    callback = DataSelectionCallback(CHIPS(sketch_dim=32, bank_size=16, curvature_samples=32), fraction=0.25,
                                     save_dir=str(tmp_path), progress=False)  # fmt: skip
    seen = _Seen()
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               callbacks=[callback, seen], enable_model_summary=False).fit(_module(), datamodule=data)  # fmt: skip
    assert len(callback.selection) == 15 and data.selection is callback.selection
    assert seen.ids == set(callback.selection.ids.tolist())  # it trained on the selection only
    with np.load(tmp_path / "round_0000.npz") as f:
        assert sorted(f["ids"].tolist()) == pool.ids.tolist()


class OwnPoolWithPairs(OwnPool):
    """:class:`OwnPool` that also gives its pairs back by id (``PairSource.load_pairs``), in its own way."""

    def load_pairs(self, ids, order=None):
        where = {uid: n for n, uid in enumerate(self.pool.ids.tolist())}
        return {uid: (self.pool[where[uid]]["image"], self.pool[where[uid]]["text"]) for uid in ids if uid in where}


@pytest.mark.parametrize("own", [OwnPool, OwnPoolWithPairs])
def test_a_data_module_of_ones_own_gets_galleries_when_it_gives_its_pairs_back(tmp_path, own):
    """Two rounds with ``gallery=3``: a pool of one's own with ``load_pairs`` gets the four galleries the callback
    picks from its round files (top and bottom, then entered and left); one without it still selects, and its
    gallery file lists every pair as missing, with the reason."""
    pool = TwoDomainPairs(40, target_fraction=0.3)
    data = own(pool, TwoDomainPairs(8, target_fraction=1.0, split="val"))
    assert isinstance(data, SelectablePool) and isinstance(data, PairSource) == (own is OwnPoolWithPairs)
    callback = DataSelectionCallback("random", fraction=0.25, every_n_epochs=1, save_dir=str(tmp_path), gallery=3,
                                     thumbnail_size=16, progress=False)  # fmt: skip
    pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               callbacks=[callback], enable_model_summary=False).fit(_module(), datamodule=data)  # fmt: skip
    previous = None
    for r in (0, 1):
        with np.load(tmp_path / f"round_{r:04d}.npz") as f:
            ids, scores, selected = f["ids"], f["scores"], f["selected"].astype(bool)
        picked = pick_gallery(ids, scores, selected, previous, 3)
        wanted = [(kind, int(ids[row])) for kind, rows in picked.items() for row in rows.tolist()]
        with np.load(gallery_path(tmp_path / f"round_{r:04d}.npz")) as f:
            shown = list(zip(f["kinds"].tolist(), f["ids"].tolist(), strict=True))
            missing = f["missing_ids"].tolist()
        if own is OwnPoolWithPairs:
            assert shown == wanted and not missing and {k for k, _ in shown} >= {"top", "bottom"}
        else:
            assert shown == [] and set(missing) == {str(i) for _, i in wanted}
        previous = selected  # the same pool in the same order: round 1 reads round 0's mask
    assert {kind for kind, _ in wanted} == {"top", "bottom", "entered", "left"}


def test_one_skipped_sample_record_names_map_style_and_shard_samples():
    pair = SkippedSample("empty caption", id=7, index=3)
    sample = SkippedSample("undecodable image", id=9, key="k1", shard="a.tar")
    shard = SkippedSample("truncated", shard="b.tar", kind="shard")
    assert pair.describe() == "id 7 (index 3): empty caption"
    assert sample.describe() == "uid 9 (key k1 of a.tar): undecodable image"
    assert shard.describe() == "shard b.tar: truncated"


def test_a_shard_pool_knows_its_length_from_img2dataset_stats_and_only_then(tmp_path):
    import json

    write_pool(tmp_path / "pool", num_pairs=30, per_shard=8)
    shards = ShardPool(WebDatasetPairs(str(tmp_path / "pool"), image_size=16), None, _collate(), batch_size=4)
    with pytest.raises(TypeError):
        len(shards.scoring_batches(0, 1))  # no stats: unknown, never a guess
    counts = {}
    for tar in sorted((tmp_path / "pool").glob("*.tar")):
        counts[tar] = sum(1 for _ in WebDatasetPairs(str(tar), image_size=16))
        (tmp_path / "pool" / f"{tar.stem}_stats.json").write_text(json.dumps({"successes": counts[tar]}))
    assert sum(counts.values()) == 30
    assert len(shards.scoring_batches(0, 1)) == 8  # ceil(30 / 4) batches: the progress bar's total
    batches = [b for b, _ in shards.scoring_batches(0, 1) if b is not None]
    assert sum(len(b["id"]) for b in batches) == 30
