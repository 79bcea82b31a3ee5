"""DataSelectionCallback + ScoredSubsetDataModule in real (tiny) Lightning fits."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import CHIPS, Random

from .conftest import TINY_VIT

POOL = 240


def _data(num_workers: int = 0, **kwargs) -> ScoredSubsetDataModule:
    return ScoredSubsetDataModule(
        TwoDomainPairs(POOL, noise_fraction=0.2, target_fraction=0.3),
        TwoDomainPairs(16, target_fraction=1.0, split="val"),
        batch_size=8,
        steps_per_round=4,
        eval_batch_size=64,
        num_workers=num_workers,
        **kwargs,
    )


def _chips() -> CHIPS:
    return CHIPS(sketch_dim=96, bank_size=48, curvature_samples=96)


class Record(pl.Callback):
    """Every training batch's ids with the selection the sampler was drawing from."""

    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        self.steps: list[tuple[int, list[int], np.ndarray | None]] = []
        self.fail_at = fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.fail_at == (trainer.current_epoch, batch_idx):
            raise RuntimeError("simulated crash")
        selection = trainer.datamodule.selection
        ids = None if selection is None else selection.ids.copy()
        self.steps.append((trainer.current_epoch, batch["id"].tolist(), ids))


def _trainer(tmp_path, callbacks, max_epochs=3, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)


def _check_batches_follow_selection(record: Record, epochs: int) -> None:
    assert len(record.steps) == 4 * epochs
    for _, ids, selected in record.steps:
        assert selected is not None and np.isin(ids, selected).all()


def test_three_rounds_train_only_on_the_current_selection(tmp_path):
    record = Record()
    callback = DataSelectionCallback(_chips(), fraction=0.3, every_n_epochs=1, save_dir=str(tmp_path / "rounds"))
    _trainer(tmp_path, [callback, record]).fit(_module(), datamodule=_data())
    _check_batches_follow_selection(record, 3)
    files = sorted((tmp_path / "rounds").glob("round_*.npz"))
    assert [f.name for f in files] == ["round_0000.npz", "round_0001.npz", "round_0002.npz"]
    selections = []
    for f in files:
        data = np.load(f)
        assert data["selected"].sum() == round(0.3 * POOL)
        assert np.array_equal(data["ids"], np.sort(data["ids"])) and len(data["ids"]) == POOL
        selections.append(set(data["ids"][data["selected"]].tolist()))
    # Each epoch drew from the round made just before it, and the model's training changed the selection.
    for epoch in range(3):
        drawn = {i for e, ids, _ in record.steps if e == epoch for i in ids}
        assert drawn <= selections[epoch]
    assert selections[0] != selections[1] and selections[1] != selections[2]
    assert callback.round == 3 and [h["round"] for h in callback.history] == [0.0, 1.0, 2.0]


def test_persistent_workers_see_each_new_selection(tmp_path):
    record = Record()
    callback = DataSelectionCallback(Random(seed=1), fraction=0.2, every_n_epochs=1, save_dir="")
    data = _data(num_workers=2, persistent_workers=True)
    _trainer(tmp_path, [callback, record]).fit(_module(), datamodule=data)
    _check_batches_follow_selection(record, 3)
    per_epoch = [{tuple(sel.tolist()) for e, _, sel in record.steps if e == epoch} for epoch in range(3)]
    assert all(len(s) == 1 for s in per_epoch) and len(set.union(*per_epoch)) == 3  # three different selections
    assert data.train_dataloader().persistent_workers


def test_one_shot_selection_by_default_and_warmup_on_the_whole_pool(tmp_path):
    one_shot = DataSelectionCallback(Random(), fraction=0.25, save_dir="")
    record = Record()
    _trainer(tmp_path, [one_shot, record]).fit(_module(), datamodule=_data())
    assert one_shot.round == 1 and len({tuple(sel) for _, _, sel in record.steps}) == 1

    warm = DataSelectionCallback(Random(), fraction=0.25, warmup_steps=4, every_n_epochs=1, save_dir="")
    record = Record()
    _trainer(tmp_path, [warm, record]).fit(_module(), datamodule=_data())
    first_epoch = [(ids, sel) for e, ids, sel in record.steps if e == 0]
    assert all(sel is None for _, sel in first_epoch)  # the whole pool during warmup
    assert all(sel is not None for e, _, sel in record.steps if e > 0)


def test_every_n_steps_reselects_at_the_first_epoch_end_after_n_steps(tmp_path):
    callback = DataSelectionCallback(Random(), fraction=0.25, every_n_steps=8, save_dir="")
    _trainer(tmp_path, [callback], max_epochs=5).fit(_module(), datamodule=_data())
    # rounds at step 0, 8, 16 (epochs of 4 steps; no round after the last epoch)
    assert [int(h["round"]) for h in callback.history] == [0, 1, 2]


def test_resume_after_a_crash_reproduces_the_uninterrupted_batches(tmp_path):
    def run(directory: Path, fail_at=None, ckpt_path=None, record=None):
        record = record or Record(fail_at)
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        callback = DataSelectionCallback(_chips(), fraction=0.3, every_n_epochs=1, save_dir=str(directory / "rounds"))
        trainer = _trainer(directory, [callback, record, checkpoint], max_epochs=4)
        trainer.fit(_module(), datamodule=_data(), ckpt_path=ckpt_path)
        return record, trainer

    full, full_trainer = run(tmp_path / "full")
    crashed = Record(fail_at=(2, 1))  # crash inside epoch 2 (trained on round 2's selection)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crash", record=crashed)
    assert {e for e, _, _ in crashed.steps} == {0, 1, 2}
    resumed, resumed_trainer = run(tmp_path / "resume", ckpt_path=str(tmp_path / "crash" / "epoch=1.ckpt"))
    assert [(e, ids) for e, ids, _ in resumed.steps] == [(e, ids) for e, ids, _ in full.steps if e >= 2]
    for a, b in zip(
        resumed_trainer.lightning_module.parameters(), full_trainer.lightning_module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"every_n_steps": 10, "every_n_epochs": 1}, "at most one"),
        ({"scorer": "no-such-scorer"}, "Unknown scorer"),
        ({"mode": "best"}, "mode"),
        ({"target": []}, "target"),
    ],
)
def test_constructor_errors_say_what_to_pass(kwargs, match):
    kwargs = {"scorer": "chips", **kwargs}
    with pytest.raises(ValueError, match=match):
        DataSelectionCallback(**kwargs)


def test_missing_target_and_wrong_datamodule_fail_before_training(tmp_path):
    data = ScoredSubsetDataModule(TwoDomainPairs(64), None, batch_size=8, steps_per_round=2)
    with pytest.raises(ValueError, match="target pairs"):
        _trainer(tmp_path, [DataSelectionCallback("chips")]).fit(_module(), datamodule=data)
    from lightning_chips.data import TwoDomainDataModule

    with pytest.raises(ValueError, match="ScoredSubsetDataModule"):
        _trainer(tmp_path, [DataSelectionCallback("random")]).fit(_module(), datamodule=TwoDomainDataModule(64, 16))


def test_tracin_accumulates_over_the_rounds_of_a_fit(tmp_path):
    """Each round's TracIn score is the sum over this and every earlier round of ``lr_round * g^T u`` (recorded
    beside the scorer), not only this round's term."""
    from lightning_chips.scoring import Dot, TracIn

    class Recording(TracIn):
        terms: list[dict[int, float]] = []

        def prepare(self, endpoint, target, pool_sample, context=None) -> None:
            super().prepare(endpoint, target, pool_sample, context)
            self.terms.append({})

        def score(self, batch):
            term = float(self.learning_rate) * Dot.score(self, batch).double().cpu()
            self.terms[-1].update(zip(batch.ids.tolist(), term.tolist(), strict=True))
            return super().score(batch)

    callback = DataSelectionCallback(Recording(bank_size=48), fraction=0.3, every_n_epochs=1, save_dir=str(tmp_path))
    _trainer(tmp_path, [callback]).fit(_module(), datamodule=_data())
    terms = Recording.terms
    assert len(terms) == 3 and callback.scorer.learning_rate > 0
    for r in range(3):
        with np.load(tmp_path / f"round_{r:04d}.npz") as f:
            expected = [sum(terms[k][int(i)] for k in range(r + 1)) for i in f["ids"]]
            np.testing.assert_allclose(f["scores"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose([terms[0][i] for i in terms[0]], 0)  # round 0's term is there to be carried
    assert len(callback.state_dict()["scorer"]["ids"]) == POOL  # every pair has a running total


def test_pool_sample_prepares_on_a_sample_and_streams_the_whole_pool(tmp_path):
    record = Record()
    callback = DataSelectionCallback(_chips(), fraction=0.3, every_n_epochs=1, pool_sample=100, save_dir=str(tmp_path))
    datamodule = _data()
    _trainer(tmp_path, [callback, record], max_epochs=2).fit(_module(), datamodule=datamodule)
    _check_batches_follow_selection(record, 2)
    data = np.load(tmp_path / "round_0001.npz")
    assert len(data["ids"]) == POOL and data["selected"].sum() == round(0.3 * POOL)  # every pair was scored
    # the last round's bank is 48 pairs of its 100-pair sample (drawn with the callback's seed and the round)
    sample = set(datamodule.pool.ids[np.random.default_rng([0, 1]).choice(POOL, size=100, replace=False)].tolist())
    bank = set(callback.scorer.state.bank.ids.tolist())
    assert len(bank) == 48 and bank <= sample

    from lightning_chips.scoring import ClipCov

    set_level = DataSelectionCallback(ClipCov(num_clusters=3), fraction=0.3, pool_sample=100, save_dir="")
    with pytest.raises(ValueError, match="set-level"):
        _trainer(tmp_path, [set_level], max_epochs=1).fit(_module(), datamodule=_data())
