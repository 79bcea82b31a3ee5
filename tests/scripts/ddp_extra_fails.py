"""A 3-epoch selection fit on 2 CPU processes (gloo) whose rank-0 extras fail: every round's image logging
(histogram and gallery) and the report at the end of the fit raise on rank 0. The fit must go on and end on both
ranks; every rank writes the warnings it gave and the selections it held as JSON.

Usage: python ddp_extra_fails.py OUT_DIR
"""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny import TINY, teardown

import lightning_chips.callback
import lightning_chips.report
from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import Random


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def failing_images(loggers, round_index, *args, **kwargs) -> None:
    if _rank() == 0:
        raise RuntimeError(f"injected gallery failure on rank 0 in round {round_index}")


def failing_report(directory) -> None:
    if _rank() == 0:
        raise RuntimeError(f"injected report failure for {Path(directory).name}")


class Record(pl.Callback):
    def __init__(self) -> None:
        self.selections: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.selections[trainer.current_epoch] = trainer.datamodule.selection.ids.tolist()


def main() -> None:
    out = Path(sys.argv[1])
    lightning_chips.callback.log_round_images = failing_images
    lightning_chips.report.build_report = failing_report
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY, lr=1e-3)
    data = ScoredSubsetDataModule(TwoDomainPairs(64), batch_size=4, steps_per_round=2, eval_batch_size=16)
    callback = DataSelectionCallback(Random(seed=1), fraction=0.5, every_n_epochs=1, save_dir=str(out / "rounds"),
                                     progress=False, gallery=2, report=True)  # fmt: skip
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[callback, record],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    lightning_chips_warnings = [str(w.message) for w in caught if "[lightning-chips]" in str(w.message)]
    with open(out / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump({"warnings": lightning_chips_warnings, "selections": record.selections, "rounds": callback.round}, f)


if __name__ == "__main__":
    main()
    teardown()
