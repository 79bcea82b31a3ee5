"""Faults through the map-style pool and the selection callback: bad samples are skipped, counted and named (never
selected, never a crash inside a worker); duplicated ids and tiny pools; SIGKILL while round files are written;
an exception on one DDP rank during a round ends the fit instead of hanging."""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.callback import NO_ID
from lightning_chips.data import ImageCaptionFolder
from lightning_chips.data.checks import CheckedPairs
from lightning_chips.engine import DUPLICATE_REASON
from lightning_chips.scoring import CLIPScore, Random
from lightning_chips.selection import write_round_file

from .conftest import TINY_VIT
from .shards import png_bytes
from .test_callback import Record

SCRIPTS = Path(__file__).parent / "scripts"


def _bomb_png() -> bytes:
    """A small file that decodes to more pixels than PIL's decompression-bomb limit (a warning, not an error,
    for PIL itself below twice the limit)."""
    buffer = io.BytesIO()
    Image.new("1", (Image.MAX_IMAGE_PIXELS // 10000 + 100, 10001)).save(buffer, format="PNG")
    return buffer.getvalue()


LONG_CAPTION = "word " * 5000


class UserPool(Dataset):
    """How a user writes a map-style pool: image bytes opened with PIL in ``__getitem__``, raw captions, ids.

    ``faults`` maps an index to what is wrong with it; every other item is a TwoDomainPairs pair.
    """

    def __init__(self, n: int, faults: dict[int, str]) -> None:
        self.base = TwoDomainPairs(n, noise_fraction=0.2, target_fraction=0.3)
        self.faults = faults

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        data, text, uid = png_bytes(item["image"]), item["text"], item["id"]
        fault = self.faults.get(index)
        if fault == "zero-byte":
            data = b""
        elif fault == "bomb":
            data = _bomb_png()
        elif fault == "garbage":
            data = b"\x89PNG\r\n\x1a\n but not really"
        elif fault == "blank":
            text = " \t\n"
        elif fault == "empty":
            text = ""
        elif fault == "latin1":
            text = "caf\xe9 au lait".encode("latin-1")
        elif fault == "long":
            text = LONG_CAPTION
        elif fault == "no-id":
            uid = None
        elif fault == "not-a-dict":
            return (item["image"], text)
        with Image.open(io.BytesIO(data)) as img:
            image = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        return {"image": image, "text": text, "id": uid, "label": item["label"]}


USER_FAULTS = {1: "zero-byte", 4: "bomb", 7: "garbage", 10: "blank", 13: "empty", 16: "latin1", 19: "long", 22: "no-id"}
USER_REASONS = {
    1: "failed to load: UnidentifiedImageError",
    4: "failed to load: DecompressionBombWarning",
    7: "failed to load: UnidentifiedImageError",
    10: "empty caption",
    13: "empty caption",
    16: "caption is not UTF-8",
    22: "missing id",
}


def test_bad_items_of_a_user_pool_are_named_in_scoring_batches_and_workers_survive():
    """Through the data module's scoring batches with 2 worker processes: every bad item is a SkippedSample with its
    index, id (when it has one) and reason beside its batch, the other items are in the tensors with their dataset
    indices, the long caption is kept (tokenized to the context length), and an item that is not a dict is an
    error naming its index."""
    pool = UserPool(24, USER_FAULTS)
    data = ScoredSubsetDataModule(pool, batch_size=4, eval_batch_size=6, num_workers=2, context_length=16)
    ids, bad = [], []
    for batch, skipped in data.scoring_batches(0, 1):
        bad += skipped
        if batch is None:
            continue
        ids += batch["id"].tolist()
        assert batch["id"].tolist() == [int(pool.base.ids[i]) for i in batch["index"].tolist()]
        assert batch["text"].shape[1:] == (16,) and len(batch["image"]) == len(batch["id"])
    assert {b.index: b.reason.split(" (")[0][: len(USER_REASONS[b.index])] for b in bad} == USER_REASONS
    # an item that failed to load has no id to tell (its index names it); an item that loaded but failed a check does
    known = {b.index: b.id for b in bad}
    assert known == {i: None if i in (1, 4, 7, 22) else int(pool.base.ids[i]) for i in USER_REASONS}
    assert sorted(ids) == sorted(int(pool.base.ids[i]) for i in range(24) if i not in USER_REASONS)
    assert int(pool.base.ids[19]) in ids  # the 25k-character caption is kept

    with pytest.raises(TypeError, match="Pool item 5 must be a dict"):
        CheckedPairs(UserPool(8, {5: "not-a-dict"}))[5]


def _write_folder(root: Path, n: int, faults: dict[int, str]) -> dict[int, str]:
    """A lazy-folder pool of TwoDomainPairs pairs as PNG + txt (+ json uid); returns {uid: expected reason}."""
    root.mkdir()
    base = TwoDomainPairs(n, noise_fraction=0.2, target_fraction=0.3)
    expected = {}
    for i in range(n):
        uid = 1000 + i
        png, txt = png_bytes(base[i]["image"]), base[i]["text"].encode()
        meta: dict = {"uid": uid}
        fault = faults.get(i)
        if fault == "zero-byte":
            png, expected[uid] = b"", "empty image file"
        elif fault == "bomb":
            png, expected[uid] = _bomb_png(), "undecodable image: DecompressionBombWarning"
        elif fault == "garbage":
            png, expected[uid] = b"\x89PNG\r\n\x1a\n but not really", "undecodable image: UnidentifiedImageError"
        elif fault == "blank":
            txt, expected[uid] = b"  \n", "empty caption"
        elif fault == "latin1":
            txt, expected[uid] = "caf\xe9".encode("latin-1"), "caption is not UTF-8"
        elif fault == "long":
            txt = LONG_CAPTION.encode()
        elif fault == "no-id":
            meta, expected[NO_ID] = {"name": "x"}, "missing uid"
        (root / f"p{i:03d}.png").write_bytes(png)
        (root / f"p{i:03d}.txt").write_bytes(txt)
        (root / f"p{i:03d}.json").write_text(json.dumps(meta))
    return expected


FOLDER_FAULTS = {3: "zero-byte", 9: "bomb", 15: "garbage", 21: "blank", 27: "latin1", 33: "long", 39: "no-id"}
FOLDER_SIZE = 48  # batch 8 x 6 steps: the warm-up epoch draws every pair once


def _trainer(root: Path, callbacks: list, max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)


class TargetCLIPScore(CLIPScore):
    """CLIPScore that asks for the target set, so that the round extracts the target's features too."""

    requires_target = True


def _folder_fit(root: Path, pool_dir: Path, max_epochs: int, record: Record, ckpt_path: str | None = None,
                target: Dataset | None = None):  # fmt: skip
    pool = ImageCaptionFolder(pool_dir, image_size=32, lazy=True)
    data = ScoredSubsetDataModule(pool, target, batch_size=8, steps_per_round=6, eval_batch_size=16)
    scorer = CLIPScore() if target is None else TargetCLIPScore()
    # a pool built of faults (12.5 % of its pairs bad, over the default 5 %): no limit
    callback = DataSelectionCallback(scorer, fraction=0.3, every_n_epochs=1, warmup_steps=6,
                                     save_dir=str(root / "rounds"), progress=False,
                                     max_skipped=1.0)  # fmt: skip
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(root, [callback, record, checkpoint], max_epochs)
    trainer.fit(_module(), datamodule=data, ckpt_path=ckpt_path)
    return callback, data


@pytest.mark.slow
def test_bad_pairs_of_a_folder_pool_are_skipped_counted_named_and_never_trained_on(tmp_path, caplog):
    """A lazy ImageCaptionFolder pool with every kind of bad pair, a warm-up epoch on the whole pool, then two
    selection rounds: no crash; training batches keep their size and never hold a bad pair (warm-up slots are
    filled with copies, recorded and warned about); each round skips the bad pairs (never selected), the round
    file names them with their reasons, the summary line and the history count them, and a bad target pair is
    skipped and counted too."""
    expected = _write_folder(tmp_path / "pool", FOLDER_SIZE, FOLDER_FAULTS)
    _write_folder(tmp_path / "target", 6, {4: "blank"})
    target = ImageCaptionFolder(tmp_path / "target", image_size=32, lazy=True)
    record = Record()
    caplog.set_level(logging.INFO)
    with pytest.warns(UserWarning, match="could not be used"):
        callback, data = _folder_fit(tmp_path / "run", tmp_path / "pool", 3, record, target=target)
    assert f"{len(expected)} pairs skipped (unreadable, failed checks" in caplog.text
    bad_uids = {uid for uid in expected if uid != NO_ID}
    assert len(record.steps) == 18
    for _, ids, _ in record.steps:
        assert len(ids) == 8 and not bad_uids & set(ids)
    warmup_seen = {b.index for b in data.skipped["pool"]}
    assert warmup_seen == {i for i, f in FOLDER_FAULTS.items() if f != "long"}  # the warm-up epoch met every one

    valid = FOLDER_SIZE - len(expected)
    for r in (0, 1):
        round_file = np.load(tmp_path / "run" / "rounds" / f"round_{r:04d}.npz")
        reasons = dict(zip(round_file["bad_ids"].tolist(), round_file["bad_reasons"].tolist(), strict=True))
        assert set(reasons) == set(expected)
        for uid, reason in expected.items():
            assert reasons[uid].startswith(reason), (uid, reasons[uid])
        assert sorted(round_file["bad_indices"].tolist()) == sorted(i for i, f in FOLDER_FAULTS.items() if f != "long")
        assert len(round_file["ids"]) == valid and not bad_uids & set(round_file["ids"].tolist())
        assert round_file["selected"].sum() == round(0.3 * valid)
        assert 1000 + 33 in round_file["ids"].tolist()  # the long caption is scored
    assert [h["skipped"] for h in callback.history] == [len(expected)] * 2
    assert [h["target_skipped"] for h in callback.history] == [1, 1]
    assert {b.id for b in callback.skipped} == set(expected) - {NO_ID} | {None}
    for epoch in (1, 2):  # after the rounds, batches come from the selection only
        assert all(np.isin(ids, sel).all() for e, ids, sel in record.steps if e == epoch)


@pytest.mark.slow
def test_resume_with_bad_pairs_in_the_pool_reproduces_the_uninterrupted_batches(tmp_path):
    """Bad pairs change nothing in resumption: a fit crashed in epoch 2 and resumed from the epoch-1 checkpoint
    draws exactly the uninterrupted fit's batches, and the resumed history keeps the earlier rounds' counts."""
    expected = _write_folder(tmp_path / "pool", FOLDER_SIZE, FOLDER_FAULTS)
    with pytest.warns(UserWarning, match="could not be used"):
        _folder_fit(tmp_path / "full", tmp_path / "pool", 4, full := Record())
        with pytest.raises(RuntimeError, match="simulated crash"):
            _folder_fit(tmp_path / "crash", tmp_path / "pool", 4, Record(fail_at=(2, 1)))
    resumed_callback, _ = _folder_fit(tmp_path / "resume", tmp_path / "pool", 4, resumed := Record(),
                                      ckpt_path=str(tmp_path / "crash" / "epoch=1.ckpt"))  # fmt: skip
    assert [(e, ids) for e, ids, _ in resumed.steps] == [(e, ids) for e, ids, _ in full.steps if e >= 2]
    assert [h["skipped"] for h in resumed_callback.history] == [len(expected)] * 3  # rounds 0, 1 (restored) and 2


class ListPool(Dataset):
    """A user pool of given ids (no ``ids`` attribute: the callback sees them only when it reads the items)."""

    def __init__(self, ids: list[int]) -> None:
        self.base, self.item_ids = TwoDomainPairs(len(ids)), ids
        self.reads = 0

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {**self.base[index], "id": self.item_ids[index]}


def test_duplicated_pool_ids_keep_their_first_pair_and_the_others_are_skipped_and_named(tmp_path):
    """A pool whose ids repeat: the first pair of each id (in dataset order) is scored, the later ones are skipped
    (never selected, counted, named in the round file with their index and the reason), whatever the order."""
    ids = [7, 8, 9, 7, 10, 11, 8, 12] * 2
    data = ScoredSubsetDataModule(ListPool(ids), batch_size=4, steps_per_round=2, context_length=16)
    callback = DataSelectionCallback(Random(), fraction=0.5, save_dir=str(tmp_path / "rounds"))
    _trainer(tmp_path, [callback], 2).fit(_module(), datamodule=data)
    first = {}
    for index, uid in enumerate(ids):
        first.setdefault(uid, index)
    later = sorted(set(range(len(ids))) - set(first.values()))
    assert sorted(callback.selection.indices.tolist()) == sorted(
        first[int(u)] for u in callback.selection.ids.tolist()
    )  # a selected id always points at its first pair
    assert [(s.index, s.id) for s in callback.skipped] == [(i, ids[i]) for i in later]
    assert all(s.reason == DUPLICATE_REASON for s in callback.skipped)
    assert callback.history[0]["skipped"] == len(later)
    with np.load(tmp_path / "rounds" / "round_0000.npz") as f:
        assert sorted(f["ids"].tolist()) == sorted(first)  # each id scored once
        assert f["bad_indices"].tolist() == later and f["bad_ids"].tolist() == [ids[i] for i in later]


def test_a_pool_smaller_than_one_batch_draws_every_selected_id(tmp_path):
    """5 pairs, batch 8: every batch is full, holds only selected ids, and every selected id is drawn."""
    record = Record()
    data = ScoredSubsetDataModule(TwoDomainPairs(5), batch_size=8, steps_per_round=2, eval_batch_size=8)
    callback = DataSelectionCallback(CLIPScore(), fraction=0.6, every_n_epochs=1, save_dir="", progress=False)
    _trainer(tmp_path, [callback, record], 2).fit(_module(), datamodule=data)
    assert len(callback.history) == 2 and len(callback.selection) == 3  # round(0.6 * 5)
    for epoch in (0, 1):
        drawn = [i for e, ids, _ in record.steps if e == epoch for i in ids]
        selected = {tuple(sel.tolist()) for e, _, sel in record.steps if e == epoch}
        assert len(selected) == 1 and len(drawn) == 16 and set(drawn) == set(next(iter(selected)))


def _write_rounds_forever(out: Path, first: int, size: int, done) -> None:
    """Write round files with the callback's writer in a loop, reporting each round number after its file is in
    place. Round ``r`` holds ids ``arange(size)``, scores all ``r`` and ``selected = ids % 7 == r % 7``."""
    ids = np.arange(size, dtype=np.int64)
    for r in itertools.count(first):
        write_round_file(out / f"round_{r:04d}.npz", ids, np.full(size, r, dtype=np.float32), ids % 7 == r % 7,
                         round=r, method="sigkill-test")  # fmt: skip
        done.send(r)


def test_sigkill_while_round_files_are_written_leaves_only_complete_rounds(tmp_path):
    """A separate process writing round files in a loop is SIGKILLed at random moments, six times, each restart
    rewriting from the last round it reported (as a resumed fit does): every round_*.npz present loads completely
    with its round's content, the last reported round is intact, and what a kill leaves mid-write is a hidden temp
    file that the round pattern does not match."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # a real process, without re-importing torch each time
    rng = np.random.default_rng(0)
    size, next_round, reported = 300_000, 0, []
    for _ in range(6):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(target=_write_rounds_forever, args=(tmp_path, next_round, size, send), daemon=True)
        proc.start()
        send.close()
        assert receive.poll(60)  # wait for the first complete round, then kill at a random moment
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        done = []
        while receive.poll():
            try:
                done.append(receive.recv())
            except EOFError:
                break
        reported.append(max(done))
        next_round = reported[-1]
    assert list(tmp_path.glob(".round_*.tmp"))  # at least one kill landed inside a write (what this test is about)
    files = sorted(tmp_path.glob("round_*.npz"))
    assert files and all(not f.name.startswith(".") for f in files)
    for path in files:
        r = int(path.stem.split("_")[1])
        with np.load(path) as data:
            assert int(data["round"]) == r and data["ids"].shape == (size,)
            np.testing.assert_array_equal(data["ids"], np.arange(size))
            assert (data["scores"] == np.float32(r)).all()
            np.testing.assert_array_equal(data["selected"], np.arange(size) % 7 == r % 7)
    assert tmp_path / f"round_{reported[-1]:04d}.npz" in files


def _run(args: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    return done, time.monotonic() - start


@pytest.mark.ddp
@pytest.mark.parametrize(("failing_rank", "failing_round"), [(1, 0), (0, 1)])
def test_an_exception_on_one_rank_during_a_round_ends_the_ddp_fit(failing_rank, failing_round):
    """2 gloo ranks; one rank's scorer raises in round 0 (before training) or round 1 (at an epoch end): the fit
    exits non-zero within a bounded time, the failing rank shows its own error and the other rank says which rank
    failed and why, instead of waiting at the score all-gather."""
    done, seconds = _run([str(SCRIPTS / "ddp_round_fail.py"), str(failing_rank), str(failing_round)])
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert seconds < 60
    assert f"injected failure on rank {failing_rank} in round {failing_round}" in output
    other = 1 - failing_rank
    assert f"Selection round {failing_round} stopped on rank {other}: rank(s) [{failing_rank}] failed" in output


@pytest.mark.ddp
def test_ddp_ranks_agree_on_the_selection_and_the_bad_pairs(tmp_path):
    """2 gloo ranks, bad pairs in both ranks' shares: both ranks hold the same selection and the same gathered
    list of bad pairs every round, no bad pair is selected or drawn, every drawn id is selected, and rank 0's
    round file names all of them."""
    done, _ = _run([str(SCRIPTS / "ddp_bad_pool.py"), str(tmp_path)], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    bad = json.loads((tmp_path / "bad.json").read_text())  # {index: id} of the bad pairs the script planted
    assert rank0["selections"] == rank1["selections"] and len(rank0["selections"]) == 2
    assert rank0["skipped"] == rank1["skipped"] == [[int(i), uid] for i, uid in bad.items()]
    bad_ids = {uid for uid in bad.values() if uid is not None}
    for rank in (rank0, rank1):
        for epoch, selected in rank["selections"].items():
            assert not bad_ids & set(selected)
            assert set(rank["batches"][epoch]) <= set(selected)
    round_file = np.load(tmp_path / "rounds" / "round_0001.npz")
    assert sorted(round_file["bad_indices"].tolist()) == sorted(int(i) for i in bad)
    assert round_file["selected"].sum() == len(rank0["selections"]["1"])
