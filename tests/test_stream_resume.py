"""Crash-then-resume of streaming CPT (WebDatasetDataModule + DataSelectionCallback): a fit resumed from a round-end
checkpoint draws exactly the uninterrupted fit's batches and ends with its selection and weights."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_chips import DataSelectionCallback, OpenCLIPModule
from lightning_chips.data.stream import WebDatasetDataModule
from lightning_chips.scoring import CHIPS

from .conftest import TINY_VIT
from .shards import write_pool

EPOCHS, STEPS, BATCH = 4, 3, 4


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream_resume")
    write_pool(root / "pool", num_pairs=48, per_shard=8, corrupt_image=5)
    write_pool(root / "target", num_pairs=8, per_shard=8, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root


class Record(pl.Callback):
    """Every training batch's ids per epoch, and the selection in force; raises at ``fail_at`` (epoch, batch)."""

    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        self.steps: list[tuple[int, list[int]]] = []
        self.selections: dict[int, list[int] | None] = {}
        self.fail_at = fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fail_at == (trainer.current_epoch, batch_idx):
            raise RuntimeError("simulated crash")
        self.steps.append((trainer.current_epoch, batch["id"].tolist()))
        selection = trainer.datamodule.selection
        self.selections[trainer.current_epoch] = None if selection is None else selection.ids.tolist()


def _fit(root: Path, directory: Path, workers: int, *, record: Record, ckpt_path: str | None = None,
         every_n_train_steps: int | None = None, warmup_steps: int = 0) -> pl.Trainer:  # fmt: skip
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
    data = WebDatasetDataModule(str(root / "pool"), str(root / "target"), batch_size=BATCH, steps_per_round=STEPS,
                                num_workers=workers, eval_batch_size=16, shuffle_buffer=6,
                                worker_start_method="fork" if workers else None)  # fmt: skip
    chips = CHIPS(sketch_dim=32, bank_size=16, curvature_samples=32)
    callback = DataSelectionCallback(chips, fraction=0.25, every_n_epochs=1, pool_sample=16, warmup_steps=warmup_steps,
                                     save_dir=str(directory / "rounds"), progress=False)  # fmt: skip
    if every_n_train_steps is None:  # at each epoch end, after the round that chose the next epoch's selection
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    else:
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_train_steps=every_n_train_steps,
                                     filename="{step}")  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, callbacks=[callback, record, checkpoint],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=directory)  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "warmup_epochs", "resume_epoch"), [(0, 0, 1), (2, 0, 1), (0, 2, 0)])
def test_resume_of_a_streaming_fit_reproduces_the_uninterrupted_batches(pool, tmp_path, workers, warmup_epochs,
                                                                        resume_epoch):  # fmt: skip
    """A streaming fit re-selecting every epoch, crashed in epoch 2 and resumed from a round-end checkpoint, draws
    exactly the uninterrupted fit's batches from the checkpoint on and ends with the same selection, round count
    and weights: resumed from the epoch-1 checkpoint (saved after round 2 chose epoch 2's selection) in the main
    process or 2 workers, and from the epoch-0 checkpoint of a fit whose first two epochs are warmup on the whole
    pool (no selection yet; round 0 happens in the resumed fit)."""
    warmup = warmup_epochs * STEPS
    full = Record()
    full_trainer = _fit(pool, tmp_path / "full", workers, record=full, warmup_steps=warmup)
    crashed = Record(fail_at=(2, 1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(pool, tmp_path / "crash", workers, record=crashed, warmup_steps=warmup)
    assert {e for e, _ in crashed.steps} == {0, 1, 2}  # it crashed in epoch 2, after its first batch
    resumed = Record()
    resumed_trainer = _fit(pool, tmp_path / "resume", workers, record=resumed, warmup_steps=warmup,
                           ckpt_path=str(tmp_path / "crash" / f"epoch={resume_epoch}.ckpt"))  # fmt: skip

    assert len(resumed.steps) == (EPOCHS - resume_epoch - 1) * STEPS
    assert resumed.steps == [(e, ids) for e, ids in full.steps if e > resume_epoch]
    assert all(len(ids) == BATCH for _, ids in resumed.steps)
    assert {e: s for e, s in full.selections.items() if e > resume_epoch} == resumed.selections
    assert [s is None for s in full.selections.values()] == [e < warmup_epochs for e in range(EPOCHS)]
    assert len({tuple(s) for s in full.selections.values() if s is not None}) > 1  # the selection moved
    callbacks = [t.callbacks[0] for t in (full_trainer, resumed_trainer)]
    assert callbacks[0].round == callbacks[1].round == EPOCHS - warmup_epochs  # none after the last epoch
    np.testing.assert_array_equal(callbacks[0].selection.ids, callbacks[1].selection.ids)
    for a, b in zip(resumed_trainer.lightning_module.parameters(), full_trainer.lightning_module.parameters(),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_warns_and_redraws_the_epoch_from_its_start(pool, tmp_path):
    """Lightning cannot resume an iterable dataset mid-epoch: a fit resumed from a checkpoint saved after the first
    batch of epoch 1 warns that its dataloader is not resumable, and finishes epoch 1 with the epoch's first
    batches again (the remaining count, not the remaining batches); round-end checkpoints are exact."""
    full = Record()
    _fit(pool, tmp_path / "full", 0, record=full, every_n_train_steps=STEPS + 1)  # step 4 = epoch 1, batch 0
    resumed = Record()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _fit(pool, tmp_path / "resume", 0, record=resumed, ckpt_path=str(tmp_path / "full" / f"step={STEPS + 1}.ckpt"))
    assert any("ended before the epoch ended" in str(w.message) for w in warned)
    epoch_1 = [ids for e, ids in full.steps if e == 1]
    assert [ids for e, ids in resumed.steps if e == 1] == epoch_1[: STEPS - 1]  # batch 0 again, batch 2 never
    assert len(resumed.steps) == EPOCHS * STEPS - (STEPS + 1)
