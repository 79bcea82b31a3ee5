"""One SGD step of a SigLIP-shaped OpenCLIPModule (sigmoid loss) on a fixed global batch of 16 built-in pairs, on 1
process (the whole batch) or on 2 gloo processes (8 pairs each, in rank order). Each rank writes its own loss, the
logged (rank-averaged) ``train/loss`` and ``train/logit_bias``; rank 0 also saves the model's weights after the step.

Usage: python ddp_siglip_step.py OUT_PREFIX DEVICES EXCHANGE(0|1)

EXCHANGE=0 sets every rank's ``SigLipLoss.world_size`` to 1 after setup (no text features from the other rank: the
control that shows the comparison can fail).
"""

import json
import math
import sys

import lightning.pytorch as pl
import torch
from tiny import TINY, teardown
from torch.utils.data import DataLoader, Subset

from lightning_chips import OpenCLIPModule, TwoDomainPairs
from lightning_chips.data import PairCollate, clip_normalize

GLOBAL_BATCH = 16
SIGLIP = {**TINY, "init_logit_bias": -10.0, "init_logit_scale": math.log(10.0)}


class SGDStep(OpenCLIPModule):
    """Plain SGD, so the weights after one step are ``w - lr * g``: equal weights mean equal gradients."""

    def __init__(self, exchange: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.exchange, self.losses = exchange, []

    def setup(self, stage):
        super().setup(stage)
        if not self.exchange:
            self.loss.world_size = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FixedBatch(pl.LightningDataModule):
    """Rank r of `world` gets pairs [r * 16 / world, (r + 1) * 16 / world) of the same 16: one global batch."""

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        share = GLOBAL_BATCH // world
        pairs = Subset(TwoDomainPairs(GLOBAL_BATCH, target_fraction=0.5), range(rank * share, (rank + 1) * share))
        tokenizer = self.trainer.lightning_module.get_tokenizer()
        return DataLoader(pairs, batch_size=share, shuffle=False, collate_fn=PairCollate(tokenizer, clip_normalize()))


def main() -> None:
    out, devices, exchange = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    pl.seed_everything(0)
    module = SGDStep(exchange, model_config=SIGLIP, weight_decay=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=FixedBatch())
    rank = trainer.global_rank
    metrics = trainer.callback_metrics
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"loss": module.losses[0], "logged": float(metrics["train/loss"]),
                   "logit_bias": float(metrics["train/logit_bias"]), "world_size": trainer.world_size,
                   "loss_type": type(module.loss).__name__}, f)  # fmt: skip
    if rank == 0:
        torch.save(torch.cat([p.detach().reshape(-1) for p in module.model.parameters()]), f"{out}.pt")


if __name__ == "__main__":
    main()
    teardown()
