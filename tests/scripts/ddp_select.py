"""A 3-round selection fit on N CPU processes (gloo); every rank writes what it selected and drew as JSON.

Usage: python ddp_select.py OUT_DIR DEVICES BATCH_SIZE SCORER [GATHER_WITH_GRAD] [WIDEN,EXPLORE,ANCHOR]

With WIDEN,EXPLORE,ANCHOR, rounds 1 and 2 are candidate rounds (``CandidateRescore(W, E, A, min_anchor=2)``).
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny import TINY, teardown

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.rescore import CandidateRescore
from lightning_chips.scoring import CHIPS, Random


class Record(pl.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}
        self.selections: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        selection = trainer.datamodule.selection
        self.selections[trainer.current_epoch] = selection.ids.tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).extend(batch["id"].tolist())


def main() -> None:
    out, devices, batch_size, scorer_name = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    pl.seed_everything(0)
    gather_with_grad = len(sys.argv) < 6 or sys.argv[5] == "1"
    rescore = None
    if len(sys.argv) > 6:
        widen, explore, anchor = (float(x) for x in sys.argv[6].split(","))
        rescore = CandidateRescore(widen, explore, anchor, min_anchor=2)
    module = OpenCLIPModule(model_config=TINY, lr=1e-3, gather_with_grad=gather_with_grad)
    data = ScoredSubsetDataModule(
        TwoDomainPairs(300, noise_fraction=0.2),
        TwoDomainPairs(24, target_fraction=1.0, split="val"),
        batch_size=batch_size,
        steps_per_round=3,
        eval_batch_size=32,
    )
    scorer = CHIPS(sketch_dim=128, bank_size=64, curvature_samples=128) if scorer_name == "chips" else Random(seed=3)
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=3,
        callbacks=[
            DataSelectionCallback(
                scorer,
                fraction=0.25,
                every_n_epochs=1,
                save_dir=str(out / "rounds"),
                progress=False,
                group_by=["domain", "noisy"],
                gallery=3,
                thumbnail_size=16,
                rescore=rescore,
            ),  # fmt: skip
            record,
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    params = torch.cat([p.detach().reshape(-1) for p in module.model.parameters()])
    torch.save(params, out / f"rank{trainer.global_rank}_of{devices}.pt")
    with open(out / f"rank{trainer.global_rank}_of{devices}.json", "w") as f:
        (selector,) = [c for c in trainer.callbacks if isinstance(c, DataSelectionCallback)]
        history = selector.history
        json.dump(
            {"batches": record.batches, "selections": record.selections, "encoded": [h["encoded"] for h in history]}, f
        )


if __name__ == "__main__":
    main()
    teardown()
