"""Bad input in a streaming pool during the callback's selection rounds (WebDatasetDataModule): every bad sample
and a truncated shard are skipped, counted once per round and named in the round file, on every DDP rank alike;
no bad sample is selected or trained on."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_chips import DataSelectionCallback, OpenCLIPModule
from lightning_chips.callback import NO_ID
from lightning_chips.data.checks import SkippedSample
from lightning_chips.data.stream import SelectedStream, WebDatasetDataModule, _Live
from lightning_chips.data.webdataset import WebDatasetPairs
from lightning_chips.scoring import CLIPScore

from .conftest import TINY_VIT
from .shards import png_bytes
from .test_faults import _bomb_png, _good, _write

SCRIPT = Path(__file__).parent / "scripts" / "ddp_bad_stream.py"
GOOD = list(range(16))  # the valid pairs' uids (four per shard)
# key -> (uid or None, start of the reason, shard) of every sample a round must skip
EXPECTED = {
    "zero": (901, "empty image file", "a.tar"),
    "bomb": (902, "undecodable image: DecompressionBomb", "a.tar"),
    "garbage": (903, "undecodable image", "a.tar"),
    "blank": (904, "empty caption", "b.tar"),
    "latin1": (905, "caption is not UTF-8", "b.tar"),
    "nouid": (None, "missing uid", "b.tar"),
    "cut": (907, "cut off by the shard's read error", "c.tar"),
    "nocaption": (908, "missing caption", "d.tar"),
}


def _image() -> bytes:
    return png_bytes(torch.rand(3, 8, 8))


def write_faulty_pool(root: Path) -> Path:
    """Four shards of four valid pairs each (uids 0-15) with every kind of bad sample among them; ``c.tar`` is
    truncated in the middle of its last sample's image (whose json, written first, gives uid 907)."""
    root.mkdir(parents=True)
    _write(root / "a.tar", [_good(0), {"__key__": "zero", "png": b"", "txt": b"x", "json": b'{"uid": 901}'},
                            _good(1), {"__key__": "bomb", "png": _bomb_png(), "txt": b"x", "json": b'{"uid": 902}'},
                            _good(2), {"__key__": "garbage", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x",
                                       "json": b'{"uid": 903}'}, _good(3)])  # fmt: skip
    _write(root / "b.tar", [_good(4), {"__key__": "blank", "png": _image(), "txt": b" \t\n", "json": b'{"uid": 904}'},
                            _good(5), {"__key__": "latin1", "png": _image(), "txt": "caf\xe9".encode("latin-1"),
                                       "json": b'{"uid": 905}'},
                            _good(6), {"__key__": "nouid", "png": _image(), "txt": b"x", "json": b'{"id": 906}'},
                            _good(7)])  # fmt: skip
    cut = {"__key__": "cut", "png": png_bytes(torch.rand(3, 32, 32)), "txt": b"x", "json": b'{"uid": 907}'}
    _write(root / "c.tar", [_good(8), _good(9), _good(10), _good(11), cut])
    with tarfile.open(root / "c.tar") as tar:
        member = tar.getmember("cut.png")
    with open(root / "c.tar", "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)
    _write(root / "d.tar", [_good(12), {"__key__": "nocaption", "png": _image(), "json": b'{"uid": 908}'},
                            _good(13), _good(14), _good(15)])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def faulty_pool(tmp_path_factory) -> Path:
    return write_faulty_pool(tmp_path_factory.mktemp("faulty_stream") / "pool")


class Record(pl.Callback):
    """Every training batch's ids with the selection in force."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[int], set[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((batch["id"].tolist(), set(trainer.datamodule.selection.ids.tolist())))


def _named(keys, ids, reasons, shards) -> dict[str, tuple[int | None, str, str]]:
    """A round file's bad-sample arrays as ``{key: (uid or None, reason, shard file name)}``."""
    rows = zip(keys, ids, reasons, shards, strict=True)
    return {str(k): (None if i == NO_ID else i, str(r), os.path.basename(str(s))) for k, i, r, s in rows}


def _assert_names_every_bad_sample(named: dict[str, tuple[int | None, str, str]]) -> None:
    assert set(named) == set(EXPECTED)
    for key, (uid, reason, shard) in EXPECTED.items():
        got_uid, got_reason, got_shard = named[key]
        assert (got_uid, got_shard) == (uid, shard) and got_reason.startswith(reason), (key, named[key])


@pytest.mark.parametrize(("pool_sample", "workers"), [(None, 0), (6, 2)])
def test_bad_samples_of_a_streaming_pool_are_counted_once_named_and_never_trained_on(faulty_pool, tmp_path, caplog,
                                                                                     pool_sample, workers):  # fmt: skip
    """A short fit on a WebDataset pool with every kind of bad sample and a truncated shard, rounds 0 and 1, with
    the whole pool as the pool sample (one pass) or a sampled one (a second pass over some of the same shards),
    in the main process or 2 workers: each round counts every bad sample exactly once (history, ``skipped``, the
    summary line), the round file names each with its uid (or NO_ID), key, shard and reason and lists the
    truncated shard with its error, every valid pair is scored, and no bad uid is selected or in a batch."""
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)
    data = WebDatasetDataModule(str(faulty_pool), batch_size=4, steps_per_round=2, num_workers=workers,
                                eval_batch_size=5, shuffle_buffer=4,
                                worker_start_method="fork" if workers else None)  # fmt: skip
    # a pool built of faults (over the default 5 % of its pairs bad): no limit
    callback = DataSelectionCallback(CLIPScore(), fraction=0.75, every_n_epochs=1, pool_sample=pool_sample,
                                     save_dir=str(tmp_path / "rounds"), progress=False,
                                     max_skipped=1.0)  # fmt: skip
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[callback, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    caplog.set_level(logging.INFO)
    with pytest.warns(UserWarning, match="could not be used") as warned:
        trainer.fit(module, datamodule=data)
    assert any("c.tar" in str(w.message) and "could not be read to the end" in str(w.message) for w in warned)

    assert [h["skipped"] for h in callback.history] == [len(EXPECTED)] * 2  # counted once per round, not per pass
    assert [h["unreadable_shards"] for h in callback.history] == [1, 1]
    summary = f"{len(EXPECTED)} pairs skipped (unreadable, failed checks or duplicate ids; the round file lists them); "
    assert caplog.text.count(summary + "1 shards could not be read to the end") == 2
    assert all(isinstance(b, SkippedSample) for b in callback.skipped)
    _assert_names_every_bad_sample({b.key: (b.id, b.reason, os.path.basename(b.shard)) for b in callback.skipped})
    assert [os.path.basename(url) for url in callback.shard_errors] == ["c.tar"]

    bad_uids = {uid for uid, _, _ in EXPECTED.values() if uid is not None}
    for r in (0, 1):
        with np.load(tmp_path / "rounds" / f"round_{r:04d}.npz") as f:
            _assert_names_every_bad_sample(_named(f["bad_keys"], f["bad_ids"].tolist(), f["bad_reasons"],
                                                  f["bad_shards"]))  # fmt: skip
            assert [os.path.basename(u) for u in f["unreadable_shards"]] == ["c.tar"]
            assert "truncated" in str(f["shard_errors"][0])
            assert f["ids"].tolist() == GOOD  # every valid pair scored once, the bad ones not at all
            assert f["selected"].sum() == round(0.75 * len(GOOD))
    assert len(record.steps) == 4
    for ids, selected in record.steps:
        assert len(ids) == 4 and set(ids) <= selected and not bad_uids & selected


@pytest.mark.ddp
def test_ddp_ranks_hold_the_same_gathered_bad_samples_of_their_own_shards(faulty_pool, tmp_path):
    """2 gloo ranks, each reading its own shards (rank 0: a.tar, c.tar; rank 1: b.tar, d.tar), both with bad
    samples: after each round both ranks hold the full gathered list of bad samples and the truncated shard, the
    same selection (no bad uid in it) and rank 0's round file names all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(faulty_pool), str(tmp_path)], capture_output=True,
                          text=True, timeout=240, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"]
    assert ranks[0]["shard_errors"] == ranks[1]["shard_errors"] == ["c.tar"]
    assert ranks[0]["history_skipped"] == ranks[1]["history_skipped"] == [len(EXPECTED)] * 2
    _assert_names_every_bad_sample({key: (uid, reason, shard) for shard, key, uid, reason in ranks[0]["skipped"]})
    assert ranks[0]["selections"] == ranks[1]["selections"]
    bad_uids = {uid for uid, _, _ in EXPECTED.values() if uid is not None}
    assert all(not bad_uids & set(selected) for selected in ranks[0]["selections"].values())
    with np.load(tmp_path / "rounds" / "round_0001.npz") as f:
        _assert_names_every_bad_sample(_named(f["bad_keys"], f["bad_ids"].tolist(), f["bad_reasons"],
                                              f["bad_shards"]))  # fmt: skip
        assert f["ids"].tolist() == GOOD


class RecordBatches(pl.Callback):
    """Every training batch's ids and keys, per epoch, as the LightningModule receives it."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[int], set[str]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.current_epoch, batch["id"].tolist(), set(batch)))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_met_by_the_training_stream_before_the_first_selection_are_counted_and_named(faulty_pool,
                                                                                                 workers):  # fmt: skip
    """With ``warmup_steps > 0`` the first epoch streams the whole faulty pool, bad samples and the truncated shard
    included, in the main process or 2 workers: every bad sample is recorded once in ``datamodule.skipped["pool"]``
    with its uid (or None), key, shard and reason, the truncated shard in ``datamodule.shard_errors``, one warning
    names them (the epoch on the selection meets nothing new), and every batch stays full, holds only valid uids
    and reaches the LightningModule without the shard reports."""
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)
    steps = 8
    data = WebDatasetDataModule(str(faulty_pool), batch_size=4, steps_per_round=steps, num_workers=workers,
                                eval_batch_size=8, shuffle_buffer=4,
                                worker_start_method="fork" if workers else None)  # fmt: skip
    # a pool built of faults (over the default 5 % of its pairs bad): no limit
    callback = DataSelectionCallback(CLIPScore(), fraction=0.75, every_n_epochs=1, warmup_steps=steps, save_dir="",
                                     progress=False, max_skipped=1.0)  # fmt: skip
    record = RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[callback, record], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.warns(UserWarning) as warned:
        trainer.fit(module, datamodule=data)

    assert list(data.skipped) == ["pool"] and all(isinstance(b, SkippedSample) for b in data.skipped["pool"])
    assert len(data.skipped["pool"]) == len(EXPECTED)  # each once, though the stream cycled over the shards
    _assert_names_every_bad_sample({b.key: (b.id, b.reason, os.path.basename(b.shard)) for b in data.skipped["pool"]})
    assert {os.path.basename(url): error.split(" (")[0] for url, error in data.shard_errors.items()} == {
        "c.tar": "truncated or unreadable after 4 samples"
    }
    stream_warnings = [str(w.message) for w in warned if "training stream" in str(w.message)]
    assert len(stream_warnings) == 1 and "epoch 0" in stream_warnings[0]
    assert f"skipped {len(EXPECTED)} pool samples" in stream_warnings[0]
    assert "1 pool shards could not be read to the end" in stream_warnings[0] and "c.tar" in stream_warnings[0]
    bad_uids = {uid for uid, _, _ in EXPECTED.values() if uid is not None}
    assert [e for e, _, _ in record.steps] == [0] * steps + [1] * steps
    for _, ids, keys in record.steps:
        assert len(ids) == 4 and set(ids) <= set(GOOD) and not bad_uids & set(ids)
        assert "reports" not in keys
    assert set().union(*(ids for e, ids, _ in record.steps if e == 0)) == set(GOOD)  # the whole pool was streamed


def test_a_training_stream_whose_shards_hold_only_bad_samples_raises_instead_of_looping(tmp_path):
    """A worker whose shards hold no usable pair (every sample bad, no selection yet) ends with an error that says
    so and counts the bad samples, instead of cycling over its shards for ever."""
    shard = tmp_path / "bad.tar"
    _write(
        shard, [{"__key__": f"bad{i}", "png": b"", "txt": b"x", "json": f'{{"uid": {i}}}'.encode()} for i in range(3)]
    )
    stream = SelectedStream(WebDatasetPairs(str(shard), image_size=16), _Live(lambda: None, lambda: 0), batches=2,
                            batch_size=2, shuffle_buffer=2, reports=True)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"holds a selected pair \(3 of their samples could not be used\)"):
        next(iter(stream))
