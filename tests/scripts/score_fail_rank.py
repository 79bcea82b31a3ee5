"""Offline score with 2 CPU ranks where one rank's scorer raises mid-pass; the job must end, not hang.

Usage: python score_fail_rank.py POOL OUTPUT FAILING_RANK

FAILING_RANK = -1: no scorer fails; each rank seeds its random model with its own rank instead (different weights).
"""

import os
import sys

import lightning.pytorch as pl
import torch
from tiny import TINY

from lightning_chips import OpenCLIPModule
from lightning_chips.offline import score_pool
from lightning_chips.scoring import CLIPScore


class FailingScorer(CLIPScore):
    def __init__(self, failing_rank: int) -> None:
        super().__init__()
        self.failing_rank, self.calls = failing_rank, 0

    def score(self, batch):
        self.calls += 1
        if int(os.environ.get("LOCAL_RANK", "0")) == self.failing_rank and self.calls == 2:
            raise RuntimeError(f"injected failure on rank {self.failing_rank}")
        return super().score(batch)


def main() -> None:
    pool, output, failing = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pl.seed_everything(0 if failing >= 0 else int(os.environ.get("LOCAL_RANK", "0")))
    module = OpenCLIPModule(model_config=TINY)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    score_pool(module, FailingScorer(failing), pool, output, batch_size=4, num_workers=0, trainer=trainer)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
