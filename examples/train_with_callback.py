"""The quickstart as a plain Python script: CPT of a tiny open_clip ViT on the CHIPS-selected 30 % of the
built-in pool, re-selected every 2 rounds (100 steps). About a minute on 2 CPU cores.

    python examples/train_with_callback.py [--max-epochs 6] [--scorer chips|random]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.scoring import CHIPS, Random

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=6, help="epochs = selection rounds of 50 steps")
    parser.add_argument("--scorer", choices=["chips", "random"], default="chips")
    parser.add_argument("--fraction", type=float, default=0.3)
    args = parser.parse_args()

    pl.seed_everything(0)
    model = OpenCLIPModule(model_config=TINY_VIT, lr=1e-3, weight_decay=0.1, warmup_steps=30)
    data = ScoredSubsetDataModule(
        pool=TwoDomainPairs(6400, target_fraction=0.2, noise_fraction=0.1),  # 20 % target domain, 10 % noisy
        target=TwoDomainPairs(128, target_fraction=1.0, split="val"),  # what we adapt to
        val=TwoDomainPairs(512, target_fraction=1.0, split="test"),  # held-out target pairs for val/loss
        batch_size=64,
        steps_per_round=50,
    )
    scorer = CHIPS(sketch_dim=512, alpha=0.7, curvature_samples=4096) if args.scorer == "chips" else Random()
    select = DataSelectionCallback(scorer, fraction=args.fraction, every_n_steps=100, save_dir="runs/script/selection")
    trainer = pl.Trainer(max_epochs=args.max_epochs, accelerator="cpu", callbacks=[select], logger=False,
                         enable_checkpointing=False, default_root_dir="runs/script")  # fmt: skip
    trainer.fit(model, datamodule=data)
    print(f"val/loss after {trainer.global_step} steps: {float(trainer.callback_metrics['val/loss']):.4f}")


if __name__ == "__main__":
    main()
