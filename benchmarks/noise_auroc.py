"""Does a scorer rank clean image-caption pairs above mismatched ones? AUROCs on the built-in two-domain data.

For each fixture seed: a tiny open_clip ViT is pretrained for 10 epochs on 3,200 built-in pairs (30 % target
domain, 30 % mismatched captions), then scores 1,000 held-out pairs of the same make against 64 target-domain
pairs. Printed per scorer, AUROC of:

* clean target-domain pairs above clean general-domain pairs (does it find the target?);
* clean above mismatched pairs within the target domain (does it pay for noise where it matters?);
* clean above mismatched pairs over the whole pool (caption quality, whatever the domain).

The pretraining and scoring are those of tests/test_quality.py (its fixture is seed 0).

    python benchmarks/noise_auroc.py                     # 3 seeds, about 5 minutes on 2 cores
    python benchmarks/noise_auroc.py --out docs/benchmarks/noise_auroc.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
from torchmetrics.functional.classification import binary_auroc  # noqa: E402

from lightning_chips import OpenCLIPModule, TwoDomainDataModule, TwoDomainPairs, resolve_adapter  # noqa: E402
from lightning_chips.data import clip_normalize  # noqa: E402
from lightning_chips.features import extract_features  # noqa: E402
from lightning_chips.scoring import CHIPS, ROBUST_COMPONENTS, build_scorer  # noqa: E402
from tests.conftest import TINY_VIT  # noqa: E402

SCORERS = {
    "clipscore": lambda: build_scorer("clipscore"),
    "negclip": lambda: build_scorer("negclip"),
    "chips: alignment only": lambda: CHIPS(bank_size=256, components=("alignment",), alpha=0.7),
    "chips (paper)": lambda: CHIPS(bank_size=256, components="paper"),
    "chips + plausibility": lambda: CHIPS(bank_size=256, components=ROBUST_COMPONENTS, noise_adaptive=False, alpha=0.7),
    "plausibility weight alone": lambda: CHIPS(
        bank_size=256, components=ROBUST_COMPONENTS, noise_adaptive=False, alpha=0.7
    ),
}
COLUMNS = ("clean target > clean general", "clean > mismatched (target domain)", "clean > mismatched (whole pool)")


def fixture(seed: int):
    """The pretrained tiny ViT and the features of its held-out pool and target (tests/test_quality.py's fixture)."""
    pl.seed_everything(seed, verbose=False)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3, warmup_steps=10)
    data = TwoDomainDataModule(num_train=3200, num_val=64, target_fraction=0.3, noise_fraction=0.3, batch_size=64,
                               seed=seed)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    common = dict(tokenizer=module.get_tokenizer(), transform=clip_normalize())
    pool = TwoDomainPairs(1000, target_fraction=0.3, noise_fraction=0.3, split="test", seed=seed, **common)
    target = TwoDomainPairs(64, target_fraction=1.0, split="val", seed=seed, **common)
    adapter = resolve_adapter(module)

    def features(dataset):
        return extract_features(adapter, torch.utils.data.DataLoader(dataset, batch_size=250))

    return adapter, pool, features(pool), features(target)


def aurocs(seed: int) -> dict[str, tuple[float, float, float]]:
    adapter, pool, pool_f, target_f = fixture(seed)
    clean, target = torch.as_tensor(~pool.noisy), torch.as_tensor(pool.domains == 1)

    def auroc(positive: torch.Tensor, scores: torch.Tensor) -> float:
        return float(binary_auroc(scores.double(), positive.long()))

    out = {}
    for name, make in SCORERS.items():
        scorer = make()
        scorer.prepare(adapter.endpoint(), target_f, pool_f)
        if name == "plausibility weight alone":
            scores = scorer.score_components(pool_f).plausibility
        else:
            scores = scorer.score(pool_f)
        out[name] = (auroc(target[clean], scores[clean]), auroc(clean[target], scores[target]), auroc(clean, scores))
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="write the table as markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    per_seed = {seed: aurocs(seed) for seed in args.seeds}
    lines = ["| scorer | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name in SCORERS:
        cells = []
        for c in range(len(COLUMNS)):
            values = [per_seed[s][name][c] for s in args.seeds]
            cells.append(" / ".join(f"{v:.3f}" for v in values) + f" (mean {statistics.mean(values):.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = " / ".join(map(str, args.seeds))
    seconds = time.perf_counter() - start
    text = f"AUROC per fixture seed {seeds} (`python benchmarks/noise_auroc.py`, {seconds:.0f} s):\n\n" + "\n".join(
        lines
    )
    print(text)
    if args.out is not None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    return text


if __name__ == "__main__":
    main()
