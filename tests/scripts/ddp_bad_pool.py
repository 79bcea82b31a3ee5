"""A 3-epoch selection fit on 2 CPU processes (gloo) over a pool with bad pairs in both ranks' shares; every
rank writes the selections, the drawn ids and the gathered bad pairs as JSON.

Usage: python ddp_bad_pool.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny import TINY
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.data.checks import BadSample
from lightning_chips.scoring import CLIPScore

BAD = {2: "blank", 5: "raise", 11: "no-id", 33: "raise", 40: "blank", 57: "bad-sample"}  # rank 0: 0-31, rank 1: 32-63


class FaultyPool(Dataset):
    def __init__(self) -> None:
        self.base = TwoDomainPairs(64, noise_fraction=0.2)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item, fault = self.base[index], BAD.get(index)
        if fault == "raise":
            raise OSError(f"cannot read image {index}")
        if fault == "bad-sample":
            raise BadSample("undecodable image: test", item["id"])
        if fault == "blank":
            item["text"] = "   "
        if fault == "no-id":
            item["id"] = None
        return item


class Record(pl.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}
        self.selections: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.selections[trainer.current_epoch] = trainer.datamodule.selection.ids.tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).extend(batch["id"].tolist())


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    pool = FaultyPool()
    data = ScoredSubsetDataModule(pool, batch_size=4, steps_per_round=3, eval_batch_size=8)
    # 6 of the 64 pairs are faults (over the default 5 %): no limit
    callback = DataSelectionCallback(CLIPScore(), fraction=0.25, every_n_epochs=1, save_dir=str(out / "rounds"),
                                     progress=False, max_skipped=1.0)  # fmt: skip
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[callback, record],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(OpenCLIPModule(model_config=TINY, lr=1e-3), datamodule=data)
    skipped = [[b.index, b.id] for b in callback.skipped]
    with open(out / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump({"batches": record.batches, "selections": record.selections, "skipped": skipped}, f)
    if trainer.is_global_zero:
        no_id = ("no-id", "raise")  # a pair whose loading raised has no id to tell
        planted = {i: (None if BAD[i] in no_id else int(pool.base.ids[i])) for i in sorted(BAD)}
        (out / "bad.json").write_text(json.dumps(planted))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
