"""Fault injection for the offline outputs (tests/test_offline_integrity.py).

Usage:
  python offline_faults.py score POOL TARGET OUTPUT SEED SLEEP   score, sleeping SLEEP s after each shard's part
  python offline_faults.py die-holding-lock OUTPUT               lock OUTPUT as `score` does, leave a temp file, SIGKILL
  python offline_faults.py reshard SCORES NPY PATTERN COUNT STEP select --reshard, os._exit(137) at STEP ("-": none)
"""

import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from tiny import TINY

from lightning_chips import OpenCLIPModule, offline
from lightning_chips import reshard as reshard_module
from lightning_chips.io import OutputLock
from lightning_chips.scoring import CHIPS


def score(pool: str, target: str, output: str, seed: str, sleep: str) -> None:
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=TINY)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    scorer = CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64, seed=int(seed))
    offline.score_pool(module, scorer, pool, output, target=target, batch_size=8, num_workers=0, pool_sample=20,
                       seed=int(seed), trainer=trainer, after_shard=lambda _: time.sleep(float(sleep)))  # fmt: skip


def die_holding_lock(output: str) -> None:
    OutputLock(Path(output) / offline.LOCK, what="lightning-chips score").acquire()
    parts = Path(output) / offline.PARTS
    parts.mkdir(parents=True, exist_ok=True)
    (parts / ".pool-000000.tar-0123456789.npz.abcd1234.tmp").write_bytes(b"PK\x03\x04 half a part")
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def reshard(scores: str, npy: str, pattern: str, count: str, step: str) -> None:
    calls: dict[str, int] = {}

    def fault(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1
        if name == step:
            os._exit(137)  # no cleanup, no finally: like SIGKILL

    reshard_module._FAULT = fault
    reshard_module.select_subset(scores, npy, count=int(count), reshard=pattern, maxcount=5)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"score": score, "die-holding-lock": die_holding_lock, "reshard": reshard}[command](*args)
