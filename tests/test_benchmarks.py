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


def test_reselect_cost_shadow_rounds_leave_the_fit_unchanged(tmp_path):
    """benchmarks/reselect_cost.py compares each candidate round with the full round of the same moment (a "shadow"
    round on a copy of the scorer): the fit with the shadow rounds is the fit without them, round for round."""
    import copy

    import lightning.pytorch as pl
    import numpy as np

    from lightning_chips import OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
    from lightning_chips.rescore import CandidateRescore
    from lightning_chips.scoring import CHIPS

    from .conftest import TINY_VIT

    spec = importlib.util.spec_from_file_location("_bench_reselect", PATH.parent / "reselect_cost.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        runs = {}
        for shadow in (False, True):
            pl.seed_everything(0)
            model = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
            data = ScoredSubsetDataModule(TwoDomainPairs(160, noise_fraction=0.2), TwoDomainPairs(16, split="val"),
                                          batch_size=8, steps_per_round=3, eval_batch_size=64)  # fmt: skip
            scorer = CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64)
            policy = CandidateRescore(1.5, 0.05, 0.1, min_anchor=2)
            runs[shadow] = bench.reselect_fit(model, data, scorer, fraction=0.3, epochs=3, seed=0, shadow=shadow,
                                              rescore=policy, root=tmp_path / str(shadow))  # fmt: skip
            runs[shadow]["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    finally:
        sys.modules.pop(spec.name, None)
    plain, shadowed = runs[False], runs[True]
    for r in range(3):
        a, b = (np.load(tmp_path / name / "rounds" / f"round_{r:04d}.npz") for name in ("False", "True"))
        assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["selected"], b["selected"])
    torch.testing.assert_close(plain["params"], shadowed["params"], rtol=0, atol=0)
    assert [r["full_overlap"] is None for r in shadowed["rounds"]] == [True, False, False]
    assert all(0 < r["full_overlap"] <= 1 for r in shadowed["rounds"][1:])
    assert len(shadowed["reuse"]) == 2 and all(-1 <= r["spearman"] <= 1 for r in shadowed["reuse"])
