"""A TracIn selection fit re-selecting every epoch on N CPU processes (gloo), checkpointed every epoch; optionally
resumed from a checkpoint. Every rank writes the size of its scorer's history as JSON; rank 0 writes the round files.

Usage: python ddp_tracin.py OUT_DIR DEVICES MAX_EPOCHS SCORER [CKPT_PATH]

SCORER is ``tracin`` (TracIn alone) or ``chain`` (a Chain that filters by CLIPScore and ranks by TracIn).
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import TINY, teardown

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import Chain, CLIPScore, TracIn

POOL = 96


def main() -> None:
    out, devices, max_epochs, scorer_name = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ckpt_path = sys.argv[5] if len(sys.argv) > 5 else None
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY, lr=2e-3)
    data = ScoredSubsetDataModule(
        TwoDomainPairs(POOL, noise_fraction=0.2, target_fraction=0.3),
        TwoDomainPairs(16, target_fraction=1.0, split="val"),
        batch_size=4,
        steps_per_round=2,
        eval_batch_size=32,
    )
    tracin = TracIn(bank_size=32)
    scorer = tracin if scorer_name == "tracin" else Chain(CLIPScore(), tracin, keep_fraction=0.5)
    selection = DataSelectionCallback(scorer, fraction=0.25, every_n_epochs=1, save_dir=str(out / "rounds"),
                                      progress=False)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=max_epochs,
        callbacks=[selection, ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    history = tracin.state_dict()
    with open(out / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump({"history_ids": history["ids"].tolist(), "rounds": selection.round}, f)


if __name__ == "__main__":
    main()
    teardown()
