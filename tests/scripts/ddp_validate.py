"""Validate a tiny OpenCLIPModule on the built-in data with N CPU processes (gloo) and write val/loss as JSON.

Usage: python ddp_validate.py OUT.json DEVICES BATCH_SIZE
"""

import json
import sys

import lightning.pytorch as pl
from tiny import TINY, teardown

from lightning_chips.data import TwoDomainDataModule
from lightning_chips.models import OpenCLIPModule


def main() -> None:
    out, devices, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY)
    data = TwoDomainDataModule(num_train=64, num_val=128, batch_size=batch_size, eval_target_fraction=0.5)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"val_loss": metrics["val/loss"], "world_size": trainer.world_size}, f)


if __name__ == "__main__":
    main()
    teardown()
