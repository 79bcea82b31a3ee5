"""The noise-adaptive plausibility weight (docs/methods.md, "How strong"): the pool's noise share estimated from
the bank against shuffled captions, and the weight it sets (none on a clean pool, the full weight on a noisy one)."""

from __future__ import annotations

import pytest
import torch

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional import chips_scores
from lightning_chips.functional.plausibility import adaptive_power, estimate_noise_share
from lightning_chips.scoring import CHIPS

D, CONCEPTS = 16, 10


def _pool(n: int, mismatched: float, uninformative: float, seed: int) -> tuple[PairFeatures, torch.Tensor]:
    """Pairs of ``CONCEPTS`` concepts, long-tailed, whose images and captions a shared direction per concept ties;
    a ``mismatched`` share carries the caption of another pair drawn at random (as web noise does: of the same
    concept by chance, then not noise), an ``uninformative`` share a generic caption (the concepts' mean plus
    noise). Returns the pairs and the true noise mask (captions of another concept, and generic ones)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CONCEPTS, D, generator=g, dtype=torch.float64)
    weights = 0.8 ** torch.arange(CONCEPTS, dtype=torch.float64)
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    image = centers[labels] + 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64)
    caption = labels.clone()
    kind = torch.zeros(n, dtype=torch.long)
    order = torch.randperm(n, generator=g)
    n_mis, n_uninf = round(mismatched * n), round(uninformative * n)
    kind[order[:n_mis]] = 1
    kind[order[n_mis : n_mis + n_uninf]] = 2
    caption[kind == 1] = labels[torch.randint(0, n, (n_mis,), generator=g)]  # another pair's caption
    text = centers[caption] + 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64)
    text[kind == 2] = centers.mean(0) + 0.6 * torch.randn(n_uninf, D, generator=g, dtype=torch.float64)
    return PairFeatures(torch.arange(n), image, text), (kind == 2) | (caption != labels)


def _endpoint() -> EndPoint:  # a model that knows the concepts: identity heads
    eye = torch.eye(D, dtype=torch.float64)
    return EndPoint(eye, eye.clone(), torch.tensor(2.5, dtype=torch.float64))


@pytest.mark.parametrize(("mismatched", "uninformative"), [(0.0, 0.0), (0.1, 0.0), (0.2, 0.15), (0.45, 0.15)])
def test_the_noise_estimate_is_within_a_tenth_of_the_true_noisy_share(mismatched, uninformative):
    for seed in range(3):
        pool, noisy = _pool(1024, mismatched, uninformative, seed)
        ep = _endpoint()
        estimate = estimate_noise_share([(ep.embed_image(pool.image), ep.embed_text(pool.text))], seed=seed)
        true = float(noisy.double().mean())
        assert abs(estimate.share - true) < 0.1, (mismatched, uninformative, seed, estimate.share, true)


def test_adaptive_power_goes_from_none_to_the_full_weight():
    assert adaptive_power(10.0, 0.0, (0.05, 0.15)) == 0.0
    assert adaptive_power(10.0, 0.05, (0.05, 0.15)) == 0.0
    assert adaptive_power(10.0, 0.10, (0.05, 0.15)) == pytest.approx(5.0)
    assert adaptive_power(10.0, 0.15, (0.05, 0.15)) == 10.0
    assert adaptive_power(10.0, 0.9, (0.05, 0.15)) == 10.0
    with pytest.raises(ValueError, match="noise_range"):
        adaptive_power(10.0, 0.1, (0.2, 0.1))


def test_the_estimate_moves_the_weight_clean_pool_paper_utility_noisy_pool_full_weight():
    ep = _endpoint()
    target, _ = _pool(40, 0.0, 0.0, seed=9)
    common = dict(sketch_dim=None, bank_size=1024, curvature_samples=512, seed=1, reference_steps=10, alpha=0.7)
    for mismatched, expect_full in ((0.0, False), (0.4, True)):
        pool, _ = _pool(1024, mismatched, 0.0, seed=3)
        args = (pool.image, pool.text, target.image, target.text, ep)
        paper = chips_scores(*args, components="paper", **common)
        fixed = chips_scores(*args, components="plausibility", noise_adaptive=False, **common)
        adaptive = CHIPS(components="plausibility", noise_adaptive=True, **common)
        adaptive.prepare(ep, target, pool)
        scores = adaptive.score_components(pool)
        metrics = adaptive.round_metrics()
        assert set(metrics) == {"noise_share", "plausibility_power"}
        assert f"noise_share~{metrics['noise_share']:.2f}" in adaptive.summary()
        if expect_full:  # a noisy pool: the fixed weight, exactly
            assert metrics["noise_share"] > 0.3 and metrics["plausibility_power"] == 10.0
            torch.testing.assert_close(scores.utility, fixed.utility)
        else:  # a clean pool: the paper's utility, exactly
            assert metrics["noise_share"] < 0.05 and metrics["plausibility_power"] == 0.0
            assert torch.equal(scores.plausibility, torch.ones_like(scores.plausibility))
            torch.testing.assert_close(scores.utility, paper.utility)
    assert CHIPS(components="paper").round_metrics() == {}  # nothing estimated without the weight


def test_a_fit_logs_the_estimate_each_round_and_keeps_it_in_the_round_file_and_report(tmp_path):
    import copy
    import csv
    import json

    import lightning.pytorch as pl
    import numpy as np
    from lightning.pytorch.loggers import CSVLogger

    from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
    from lightning_chips.report import build_report

    from .conftest import TINY_VIT

    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
    data = ScoredSubsetDataModule(TwoDomainPairs(160, noise_fraction=0.3, target_fraction=0.3),
                                  TwoDomainPairs(16, target_fraction=1.0, split="val"), batch_size=8,
                                  steps_per_round=3, eval_batch_size=64)  # fmt: skip
    scorer = CHIPS(components="plausibility", sketch_dim=64, bank_size=64, curvature_samples=64, reference_steps=5)
    callback = DataSelectionCallback(scorer, fraction=0.3, every_n_epochs=1, save_dir=str(tmp_path / "rounds"))
    logger = CSVLogger(tmp_path, name="csv")
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=[callback], logger=logger,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               log_every_n_steps=1).fit(module, datamodule=data)  # fmt: skip
    estimates = [h["noise_share"] for h in callback.history]
    assert len(estimates) == 2 and all(0.0 <= e <= 1.0 for e in estimates)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        logged = [float(r["selection/noise_share"]) for r in csv.DictReader(handle) if r.get("selection/noise_share")]
    assert logged == pytest.approx(estimates)
    files = sorted((tmp_path / "rounds").glob("round_*.npz"))
    settings = [json.loads(str(np.load(f)["settings"])) for f in files]
    assert [s["estimate.noise_share"] for s in settings] == pytest.approx(estimates)
    assert all(s["scorer.noise_adaptive"] is True for s in settings)
    shares = [h["target_share"] for h in callback.history]  # alpha="auto": the target-share estimate, the same way
    assert all(0.0 <= e <= 1.0 for e in shares) and [h["alpha"] for h in callback.history] == pytest.approx(
        [0.7 * (1 - e) for e in shares])  # fmt: skip
    assert [s["estimate.target_share"] for s in settings] == pytest.approx(shares)
    page = build_report(tmp_path / "rounds", tmp_path / "report.html")
    assert "estimate.noise_share" in page.read_text()


def test_offline_score_keeps_the_estimate_in_its_manifest_and_report(tmp_path):
    import copy
    import json

    import lightning.pytorch as pl

    from lightning_chips import OpenCLIPModule
    from lightning_chips.offline import score_pool
    from lightning_chips.report import build_report

    from .conftest import TINY_VIT
    from .shards import write_pool

    write_pool(tmp_path / "pool", num_pairs=24, per_shard=8)
    write_pool(tmp_path / "target", num_pairs=8, per_shard=8, target_fraction=1.0, split="val", prefix="target")
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    scorer = CHIPS(components="plausibility", sketch_dim=32, bank_size=24, curvature_samples=16, reference_steps=3)
    out = tmp_path / "out"
    score_pool(module, scorer, str(tmp_path / "pool"), str(out), target=str(tmp_path / "target"), batch_size=8,
               num_workers=0, trainer=trainer)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["estimate"] == pytest.approx(scorer.round_metrics())
    assert 0.0 <= manifest["estimate"]["noise_share"] <= 1.0
    page = build_report(out, tmp_path / "report.html").read_text()
    assert "estimate.noise_share" in page
