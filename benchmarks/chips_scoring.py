"""CHIPS scoring cost relative to a forward-only feature pass, measured side by side in one run.

Both passes run over the same pool + target pairs with the same model, batch size and threads:
  forward-only: the image and text towers over every pair (what any data-selection method must pay);
  CHIPS:        the same feature pass, then `CHIPS.prepare` (bank, target gradient, curvature solve) and the
                streaming `CHIPS.score` over the pool.
Repetitions alternate the two passes; the table reports medians and the ratio CHIPS / forward-only.

    python benchmarks/chips_scoring.py                       # tiny ViT and ViT-B-32 (random weights, 224 px)
    python benchmarks/chips_scoring.py --models ViT-B-16 --pool 2048 --device cuda --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import open_clip
import torch
from torch.utils.data import DataLoader

from lightning_chips.adapters import resolve_adapter
from lightning_chips.data import TwoDomainPairs, clip_normalize
from lightning_chips.features import extract_features
from lightning_chips.scoring import CHIPS

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _model(name: str) -> torch.nn.Module:
    if name == "tiny-vit":
        return open_clip.CLIP(**TINY)
    return open_clip.create_model(name, pretrained=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(dataset: TwoDomainPairs, batch_size: int, device: torch.device) -> list[dict]:
    """Pre-collated batches on the device, so data loading is outside both timings."""
    loader = DataLoader(dataset, batch_size=batch_size)
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in loader]


def run(name: str, pool_size: int, target_size: int, batch_size: int, reps: int, device: torch.device) -> dict:
    model = _model(name).to(device).eval()
    adapter = resolve_adapter(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    common = dict(image_size=int(size), tokenizer=tokenizer, transform=clip_normalize())
    pool = _batches(TwoDomainPairs(pool_size, target_fraction=0.2, **common), batch_size, device)
    target = _batches(TwoDomainPairs(target_size, target_fraction=1.0, split="val", **common), batch_size, device)
    scorer = CHIPS(components="paper")  # paper defaults: k = 512, alpha = 0.7, bank 1024, curvature 8192

    def forward_only() -> None:
        extract_features(adapter, target, device=device)
        extract_features(adapter, pool, device=device)

    def chips_pass() -> None:
        target_f = extract_features(adapter, target, device=device)
        pool_f = extract_features(adapter, pool, device=device)
        scorer.prepare(adapter.endpoint(), target_f, pool_f)
        for batch in pool_f.batches(batch_size):
            scorer.score(batch.to(device))

    timings: dict[str, list[float]] = {"forward": [], "chips": []}
    forward_only()  # warm-up (allocator, kernels)
    chips_pass()
    for _ in range(reps):
        for key, fn in (("forward", forward_only), ("chips", chips_pass)):
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            _sync(device)
            timings[key].append(time.perf_counter() - start)
    fwd, chips = statistics.median(timings["forward"]), statistics.median(timings["chips"])
    ep = adapter.endpoint()
    return {
        "model": name,
        "pairs": pool_size + target_size,
        "dim_theta": ep.num_parameters,
        "forward_s": fwd,
        "chips_s": chips,
        "ratio": chips / fwd,
        "summary": scorer.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-vit", "ViT-B-32"])
    parser.add_argument("--pool", type=int, default=384)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = [run(m, args.pool, args.target, args.batch_size, args.reps, device) for m in args.models]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = (
        f"CHIPS scoring vs forward-only feature pass, {where}, torch {torch.__version__}, "
        f"{platform.python_implementation()} {platform.python_version()}, batch {args.batch_size}, "
        f"median of {args.reps}\n\n"
        "| model | pairs (pool + target) | dim(theta) | forward-only (s) | CHIPS (s) | ratio |\n"
        "|---|---|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {r['model']} | {r['pairs']} | {r['dim_theta']:,} | {r['forward_s']:.3f} | {r['chips_s']:.3f} | "
        f"{r['ratio']:.3f} |\n"
        for r in rows
    )
    print(table)
    for r in rows:
        print(f"{r['model']}: {r['summary']}")
    if args.write is not None:
        with args.write.open("a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
