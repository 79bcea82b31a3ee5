"""What a newcomer sees in a fit: a summary line per round in plain words, progress bars with totals that follow
``Trainer(enable_progress_bar=...)``, and no warning about a validation loop nobody asked for."""

from __future__ import annotations

import copy
import logging
import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch import LightningModule

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs

from .conftest import TINY_VIT


class NoValidation(OpenCLIPModule):
    validation_step = LightningModule.validation_step  # a module of one's own without validation


def _fit(module, data, *, progress: bool, epochs: int = 2) -> None:
    callback = DataSelectionCallback("random", fraction=0.25, every_n_epochs=1, save_dir="")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=2, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                         callbacks=[callback])  # fmt: skip
    trainer.fit(module, datamodule=data)


def _data(**kwargs) -> ScoredSubsetDataModule:
    return ScoredSubsetDataModule(TwoDomainPairs(40), batch_size=8, steps_per_round=2, eval_batch_size=16, **kwargs)


def _module(cls=OpenCLIPModule):
    pl.seed_everything(0)
    return cls(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)


@pytest.mark.parametrize("with_val", [False, True])
def test_no_validation_warning_unless_there_is_a_validation_set(with_val):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_module(NoValidation), _data(val=TwoDomainPairs(8, split="val") if with_val else None), progress=False)
    warned = any("val_dataloader` but have no `validation_step" in str(w.message) for w in caught)
    assert warned == with_val  # a real validation set without validation_step still warns


def test_each_round_says_in_words_what_was_kept_and_how_long_it_took(caplog):
    with caplog.at_level(logging.INFO):
        _fit(_module(), _data(), progress=False, epochs=2)
    lines = [r.getMessage() for r in caplog.records if "[lightning-chips] round" in r.getMessage()]
    assert len(lines) == 2
    assert "round 0 at step 0: kept 10 of 40 pool pairs (25.0%) by Random;" in lines[0]
    assert "kept last round too" not in lines[0] and "of them were kept last round too" in lines[1]
    assert all("the round took" in line and "of the fit so far" in line for line in lines)


def test_progress_bars_have_totals_and_follow_the_trainer(capsys):
    _fit(_module(), _data(), progress=True, epochs=1)
    shown = capsys.readouterr().err
    assert "round 0: pool" in shown and "/3 [" in shown  # 40 pairs in batches of 16: 3 batches, with the total
    _fit(_module(), _data(), progress=False, epochs=1)
    assert "round 0: pool" not in capsys.readouterr().err


def test_a_rerun_never_overwrites_an_earlier_runs_round_files(tmp_path):
    def fit(**kwargs):
        callback = DataSelectionCallback("random", fraction=0.25, **kwargs)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False, callbacks=[callback],
                             logger=pl.loggers.CSVLogger(tmp_path / "logs"))  # fmt: skip
        trainer.fit(_module(), datamodule=_data())

    fit()
    fit()  # the default folder is inside the logger's version folder
    versions = sorted(p.parent.parent.name for p in (tmp_path / "logs").rglob("round_0000.npz"))
    assert versions == ["version_0", "version_1"]
    fit(save_dir=str(tmp_path / "rounds"))
    before = (tmp_path / "rounds" / "round_0000.npz").read_bytes()
    with pytest.raises(ValueError, match="already holds round files of an earlier run.*overwrite=True"):
        fit(save_dir=str(tmp_path / "rounds"))
    assert (tmp_path / "rounds" / "round_0000.npz").read_bytes() == before
    fit(save_dir=str(tmp_path / "rounds"), overwrite=True)
