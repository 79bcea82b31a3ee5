"""A 2-round CHIPS fit on a WebDataset pool with 2 CPU ranks (gloo); each rank writes its selections and batches.

Usage: python ddp_stream.py SHARDS_ROOT OUT_DIR
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny import TINY

from lightning_chips import DataSelectionCallback, OpenCLIPModule
from lightning_chips.data.stream import WebDatasetDataModule
from lightning_chips.scoring import CHIPS


class Record(pl.Callback):
    def __init__(self) -> None:
        self.batches, self.selections = {}, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.selections[trainer.current_epoch] = trainer.datamodule.selection.ids.tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).extend(batch["id"].tolist())


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY, lr=1e-3)
    data = WebDatasetDataModule(str(root / "pool"), str(root / "target"), batch_size=8, steps_per_round=3,
                                num_workers=0, shuffle_buffer=16)  # fmt: skip
    record = Record()
    callback = DataSelectionCallback(CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64), fraction=0.25,
                                     every_n_epochs=1, pool_sample=24, save_dir="", progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[callback, record],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    with open(out / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump({"batches": record.batches, "selections": record.selections}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
