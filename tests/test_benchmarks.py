"""Smoke test of benchmarks/throughput.py on the tiny ViT: every row is produced and finite (no timing assertions)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("dattri")
pytest.importorskip("scipy")

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # seconds even when the 2-core machine is busy
    spec = importlib.util.spec_from_file_location("_bench_throughput", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)


def test_throughput_benchmark_runs_on_the_tiny_model(throughput, tmp_path):
    setup = throughput.build("tiny-vit", pool=12, target=4, batch_size=8)
    times = throughput.time_methods(setup, repeats=1, warmup=False)
    outputs = times.pop("outputs")
    for m in throughput.METHODS:
        assert math.isfinite(times[m]) and times[m] > 0
        if m not in ("forward", "forward_full"):
            scores = outputs[m]["scores"]
            assert scores.shape == (12,) and bool(scores.isfinite().all()), m
    agreement = throughput.agreement(setup, outputs)
    # dattri's exact TracIn and the closed-form Dot differentiate the same per-sample loss.
    assert agreement["tracin_exact_vs_dot"] > 0.99
    # Cutting the padding the causal text tower never reads leaves dattri's TRAK scores unchanged.
    assert agreement["trak_vs_trak_trimmed"] > 0.999
    torch.testing.assert_close(outputs["trak_trimmed"]["scores"], outputs["trak"]["scores"], rtol=1e-3, atol=1e-6)
    memory = throughput.memory_probe("tiny-vit", pool=16, sample=8, target=4, batch_size=8)
    assert math.isfinite(memory["peak_growth_mib"]) and memory["scores_kib"] == pytest.approx(16 * 8 / 1024)  # float64

    result = {
        "times": times,
        "bank_s": throughput._timed(throughput.loss_bank, setup),
        "bank_pairs": setup.extras["bank_pairs"],
        "memory": [memory, {**memory, "pool": 64}],
        "agreement": agreement,
        "args": {"model": "tiny-vit", "pool": 12, "target": 4, "batch_size": 8, "repeats": 1},
        "date": "today",
        "machine": "test",
        "device": "CPU",
        "dattri": "0.3.0",
        "load_before": "0",
        "load_after": "0",
        "wall_s": 1.0,
        "command": "python benchmarks/throughput.py --quick",
    }
    table = throughput.table(result)
    for m in throughput.METHODS:
        assert throughput.LABELS[m] in table
    assert "| 16 |" in table and "| 64 |" in table
    # --write replaces its own section and keeps the others.
    doc = tmp_path / "benchmarks.md"
    title = "## Throughput vs dattri: tiny-vit, 12 pool pairs"
    doc.write_text(f"# Benchmarks\n\n## A\ntext a\n\n{title}\nSTALE-TEXT\n\n## B\ntext b\n")
    throughput.write_section(doc, throughput.section(result))
    throughput.write_section(doc, throughput.section(result))
    text = doc.read_text()
    assert text.count(title) == 1 and "STALE-TEXT" not in text
    assert "## A\ntext a" in text and "## B\ntext b" in text and text.index("## A") < text.index("## B")
