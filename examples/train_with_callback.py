"""The quickstart as a plain Python script: CPT of a tiny open_clip ViT on the selected 30 % of the built-in pool
(6,400 pairs: 20 % target domain, 10 % mismatched captions), re-selected every 100 steps, 300 steps.

It prints, per run, the validation loss on 512 held-out target-domain pairs, the wall time, and what each selection
round held: the share of target-domain pairs and of mismatched captions (the pool holds 20 % and 10 %).

    python examples/train_with_callback.py                         # CHIPS, the paper's utility
    python examples/train_with_callback.py --scorer robust         # CHIPS times the plausibility weight
    python examples/train_with_callback.py --scorer adaptive       # that weight as strong as the pool's noise asks
    python examples/train_with_callback.py --compare random        # and a Random run beside it, same seed
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import CHIPS, ROBUST_COMPONENTS, Random, Scorer

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SCORERS = {
    "chips": lambda: CHIPS(sketch_dim=512, alpha=0.7, curvature_samples=4096, components="paper"),  # the paper's
    "robust": lambda: CHIPS(
        sketch_dim=512, alpha=0.7, curvature_samples=4096, components=ROBUST_COMPONENTS, noise_adaptive=False
    ),  # the plausibility weight at a fixed gamma
    "adaptive": lambda: CHIPS(sketch_dim=512, alpha=0.7, curvature_samples=4096),  # CHIPS()'s weight, alpha 0.7
    "random": Random,
}


def run(name: str, scorer: Scorer, max_epochs: int, fraction: float, out: Path) -> dict:
    """One CPT run; returns its val/loss, wall time and per-round composition."""
    pl.seed_everything(0)
    model = OpenCLIPModule(model_config=TINY_VIT, lr=1e-3, weight_decay=0.1, warmup_steps=30)
    pool = TwoDomainPairs(6400, target_fraction=0.2, noise_fraction=0.1)
    data = ScoredSubsetDataModule(
        pool=pool,
        target=TwoDomainPairs(128, target_fraction=1.0, split="val"),  # what we adapt to
        val=TwoDomainPairs(512, target_fraction=1.0, split="test"),  # held-out target pairs for val/loss
        batch_size=64,
        steps_per_round=50,
    )
    select = DataSelectionCallback(
        scorer, fraction=fraction, every_n_steps=100, save_dir=str(out / name), overwrite=True
    )  # this script owns its output folder
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=[select], logger=False,
                         enable_checkpointing=False, default_root_dir=str(out))  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    position = {int(uid): i for i, uid in enumerate(pool.ids)}
    rounds = []
    for path in sorted((out / name).glob("round_*.npz")):
        with np.load(path) as f:
            chosen = np.array([position[int(u)] for u in f["ids"][f["selected"]]])
        rounds.append((float(pool.domains[chosen].mean()), float(pool.noisy[chosen].mean())))
    return {"val_loss": float(trainer.callback_metrics["val/loss"]), "steps": trainer.global_step,
            "seconds": seconds, "rounds": rounds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=6, help="epochs of 50 steps (a round every 2)")
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="chips")
    parser.add_argument("--compare", choices=sorted(SCORERS), default=None, help="a second run with this scorer")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--out", default="runs/script", help="where the round files go")
    args = parser.parse_args()

    names = [args.scorer] + ([args.compare] if args.compare and args.compare != args.scorer else [])
    results = {name: run(name, SCORERS[name](), args.max_epochs, args.fraction, Path(args.out)) for name in names}
    print("\nscorer   val/loss   steps   wall   selection rounds: target-domain share / mismatched share")
    for name, r in results.items():
        shares = ", ".join(f"{t:.1%} / {n:.1%}" for t, n in r["rounds"])
        print(f"{name:8} {r['val_loss']:8.4f} {r['steps']:7d} {r['seconds']:5.0f}s   {shares}")
    print("(the pool holds 20.0 % target-domain pairs and 10.0 % mismatched captions)")


if __name__ == "__main__":
    main()
