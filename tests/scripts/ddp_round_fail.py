"""A selection fit on 2 CPU processes (gloo) whose scorer raises on one rank during one round; it must end, not
hang at the all-gather.

Usage: python ddp_round_fail.py FAILING_RANK FAILING_ROUND
"""

import os
import sys

import lightning.pytorch as pl
from tiny import TINY

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import CLIPScore


class FailingScorer(CLIPScore):
    """CLIPScore that raises on one rank when it scores in one round."""

    def __init__(self, failing_rank: int, failing_round: int) -> None:
        super().__init__()
        self.failing_rank, self.failing_round = failing_rank, failing_round

    def score(self, batch):
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        if rank == self.failing_rank and self.round == self.failing_round:
            raise RuntimeError(f"injected failure on rank {rank} in round {self.round}")
        return super().score(batch)


def main() -> None:
    failing_rank, failing_round = int(sys.argv[1]), int(sys.argv[2])
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY, lr=1e-3)
    data = ScoredSubsetDataModule(TwoDomainPairs(64), batch_size=4, steps_per_round=2, eval_batch_size=8)
    callback = DataSelectionCallback(FailingScorer(failing_rank, failing_round), fraction=0.5, every_n_epochs=1,
                                     save_dir="", progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
