"""Run the offline score pass on a tiny CLIP; optionally SIGKILL the process after N shards are written.

Usage: python score_pool.py POOL TARGET OUTPUT [KILL_AFTER_SHARDS]
"""

import os
import signal
import sys

import lightning.pytorch as pl
from tiny import TINY

from lightning_chips import OpenCLIPModule
from lightning_chips.offline import score_pool
from lightning_chips.scoring import CHIPS


def main() -> None:
    pool, target, output = sys.argv[1:4]
    kill_after = int(sys.argv[4]) if len(sys.argv) > 4 else None
    written = []

    def after_shard(report) -> None:
        written.append(report.url)
        if kill_after is not None and len(written) >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: like the OOM killer

    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    scorer = CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64)
    score_pool(module, scorer, pool, output, target=target, batch_size=8, num_workers=0, pool_sample=20,
               trainer=trainer, after_shard=after_shard)  # fmt: skip


if __name__ == "__main__":
    main()
