"""A 2-epoch selection fit on 2 CPU processes (gloo) over a WebDataset pool with bad samples in both ranks'
shards; every rank writes its gathered bad samples, unreadable shards, skipped counts and selections as JSON.

Usage: python ddp_bad_stream.py POOL_DIR OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny import TINY

from lightning_chips import DataSelectionCallback, OpenCLIPModule
from lightning_chips.data.stream import WebDatasetDataModule
from lightning_chips.scoring import CLIPScore


class Record(pl.Callback):
    def __init__(self) -> None:
        self.selections: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.selections[trainer.current_epoch] = trainer.datamodule.selection.ids.tolist()


def main() -> None:
    pool, out = Path(sys.argv[1]), Path(sys.argv[2])
    pl.seed_everything(0)
    data = WebDatasetDataModule(str(pool), batch_size=4, steps_per_round=2, eval_batch_size=5, shuffle_buffer=4)
    # a pool built of faults (over the default 5 % of its pairs bad): no limit
    callback = DataSelectionCallback(CLIPScore(), fraction=0.75, every_n_epochs=1, save_dir=str(out / "rounds"),
                                     progress=False, max_skipped=1.0)  # fmt: skip
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[callback, record],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(OpenCLIPModule(model_config=TINY, lr=1e-3), datamodule=data)
    result = {
        "skipped": [[os.path.basename(b.shard), b.key, b.id, b.reason] for b in callback.skipped],
        "shard_errors": [os.path.basename(url) for url in callback.shard_errors],
        "history_skipped": [h["skipped"] for h in callback.history],
        "selections": record.selections,
    }
    with open(out / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
