"""A selection round's metrics are where Lightning's monitors look: ``ModelCheckpoint(monitor="selection/...")``
saves by them and ``EarlyStopping`` stops on them, in a fresh and in a resumed fit."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import Random

from .conftest import TINY_VIT


def _fit(tmp_path, callbacks, max_epochs, ckpt_path=None, selector=None):
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
    data = ScoredSubsetDataModule(TwoDomainPairs(96, noise_fraction=0.2, target_fraction=0.3),
                                  TwoDomainPairs(8, target_fraction=1.0, split="val"), batch_size=8,
                                  steps_per_round=2, eval_batch_size=48)  # fmt: skip
    selector = selector or DataSelectionCallback(Random(seed=1), fraction=0.5, every_n_epochs=1,
                                                 save_dir=str(tmp_path / "rounds"), overwrite=True)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=[selector, *callbacks],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return selector, trainer


def test_model_checkpoint_saves_by_a_selection_metric(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="selection/score_q50", mode="max", save_top_k=1,
                           filename="{epoch}")  # fmt: skip
    selector, _ = _fit(tmp_path, [best], max_epochs=3)
    assert len(selector.history) == 3  # round 0 at fit start, then after epochs 0 and 1
    # each epoch's checkpoint sees the round run at that epoch's end (the last epoch keeps round 2's value)
    medians = [h["score_q50"] for h in selector.history[1:]]
    assert float(best.best_model_score) == pytest.approx(max(medians))
    assert best.best_model_path.endswith(f"epoch={medians.index(max(medians))}.ckpt")


class _Probe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.seen = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("selection/")}


def test_early_stopping_on_a_selection_metric_and_a_resumed_fit_sees_the_last_round(tmp_path):
    # overlap with the previous selection never improves above 1: patience 1 stops after two more epochs
    stop = EarlyStopping(
        monitor="selection/overlap", mode="max", patience=1, min_delta=1.0, check_on_train_epoch_end=True
    )
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    selector, trainer = _fit(tmp_path, [stop, last], max_epochs=10)
    assert trainer.current_epoch < 10 and trainer.should_stop
    probe = _Probe()
    resumed = DataSelectionCallback(Random(seed=1), fraction=0.5, every_n_epochs=1, save_dir=str(tmp_path / "rounds"))
    _fit(tmp_path, [probe], max_epochs=trainer.current_epoch + 1, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
         selector=resumed)  # fmt: skip
    assert probe.seen["selection/round"] == selector.history[-1]["round"]
    assert probe.seen["selection/overlap"] == pytest.approx(selector.history[-1]["overlap"])
