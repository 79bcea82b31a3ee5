"""Peak memory of ``lightning-chips score`` at N and 4N pool pairs: it must not grow with the pool beyond the
score arrays (8 bytes of id + 4 bytes of score per pair, plus the merge).

Each size runs in a fresh process (one process, no dataloader workers, so the peak RSS is the whole job's), over
WebDataset shards of built-in pairs written by this script, with CHIPS on a tiny open_clip ViT:

    python benchmarks/score_memory.py                      # N = 2,000 and 8,000
    python benchmarks/score_memory.py --pairs 5000 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

CHILD = """
import json, resource, sys, time
from lightning_chips.cli import main
start = time.perf_counter()
main(sys.argv[2:])
print("RESULT " + json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "seconds": time.perf_counter() - start}))
"""


def _write(directory: Path, pairs: int) -> None:
    from tests.shards import write_pool

    write_pool(directory / "pool", num_pairs=pairs, per_shard=500)
    if not (directory / "target").exists():
        write_pool(directory / "target", num_pairs=64, per_shard=64, uid_offset=0, target_fraction=1.0, split="val",
                   prefix="target")  # fmt: skip


def _score(directory: Path, out: Path) -> dict:
    args = [
        "score", "--pool", str(directory / "pool"), "--target", str(directory / "target"), "--output", str(out),
        "--model", "OpenCLIPModule", "--model.model_config", json.dumps(TINY), "--scorer", "chips",
        "--batch_size", "256", "--num_workers", "0", "--pool_sample", "1024", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CHILD, "x", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="N (the second run scores 4N)")
    parser.add_argument("--write", type=Path, help="replace the score-memory section of this markdown file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.pairs, 4 * args.pairs):
            directory = Path(tmp) / str(n)
            _write(directory, n)
            result = _score(directory, directory / "out")
            rows.append((n, result["peak_rss_mib"], result["seconds"]))
            print(f"N={n:>7}: peak RSS {result['peak_rss_mib']:.0f} MiB, {result['seconds']:.1f} s", flush=True)
    growth = rows[1][1] - rows[0][1]
    arrays = 3 * args.pairs * 12 / 2**20
    summary = (
        f"Peak RSS grows by {growth:.1f} MiB from N to 4N pairs; the score arrays of the extra pairs take "
        f"{arrays:.2f} MiB."
    )
    print(summary)
    if args.write:
        table = [
            "## Offline `score` memory at N and 4N pairs (`benchmarks/score_memory.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()} "
            f"({__import__('os').cpu_count()} cores), CHIPS (k = 512) on the tiny open_clip ViT (32 px), one process, "
            "no dataloader workers, pool sample 1,024, shards of 500 built-in pairs; "
            f"command: `python benchmarks/score_memory.py --pairs {args.pairs}`.",
            "",
            "| pool pairs | peak RSS (MiB) | wall (s) |",
            "|---|---|---|",
            *[f"| {n:,} | {rss:.0f} | {sec:.1f} |" for n, rss, sec in rows],
            "",
            summary,
            "",
        ]
        path = args.write
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        head = "## Offline `score` memory"
        if head in text:
            start = text.index(head)
            nxt = text.find("\n## ", start + 1)
            text = text[:start] + "\n".join(table) + ("" if nxt < 0 else text[nxt + 1 :])
        else:
            text = text.rstrip("\n") + "\n\n" + "\n".join(table)
        path.write_text(text)


if __name__ == "__main__":
    main()
