"""One SGD step of OpenCLIPModule on a fixed global batch of 32 built-in pairs, on 1 process (the whole batch) or
on 2 gloo processes (16 pairs each, in rank order); rank 0 saves the model's weights after the step.

Usage: python ddp_grad_step.py OUT_FILE DEVICES GATHER_WITH_GRAD(0|1)
"""

import sys

import lightning.pytorch as pl
import torch
from tiny import TINY, teardown
from torch.utils.data import DataLoader, Subset

from lightning_chips import OpenCLIPModule, TwoDomainPairs
from lightning_chips.data import PairCollate, clip_normalize

GLOBAL_BATCH = 32


class SGDStep(OpenCLIPModule):
    """Plain SGD, so the weights after one step are ``w - lr * g``: equal weights mean equal gradients."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FixedBatch(pl.LightningDataModule):
    """Rank r of `world` gets pairs [r * 32 / world, (r + 1) * 32 / world) of the same 32: one global batch."""

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        share = GLOBAL_BATCH // world
        pairs = Subset(TwoDomainPairs(GLOBAL_BATCH, target_fraction=0.5), range(rank * share, (rank + 1) * share))
        tokenizer = self.trainer.lightning_module.get_tokenizer()
        return DataLoader(pairs, batch_size=share, shuffle=False, collate_fn=PairCollate(tokenizer, clip_normalize()))


def main() -> None:
    out, devices, gather_with_grad = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    pl.seed_everything(0)
    module = SGDStep(model_config=TINY, gather_with_grad=gather_with_grad, weight_decay=0.0)
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
    if trainer.global_rank == 0:
        torch.save(torch.cat([p.detach().reshape(-1) for p in module.model.parameters()]), out)


if __name__ == "__main__":
    main()
    teardown()
