"""The curvature mix that follows the pool (docs/methods.md, "How much negative curvature"): the pool's
target-domain share estimated against the target set, and ``alpha="auto"`` = ``0.7 (1 - share)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_chips.endpoint import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional import chips_scores
from lightning_chips.functional.chips import ChipsArguments
from lightning_chips.functional.target_share import adaptive_alpha, estimate_target_share
from lightning_chips.scoring import CHIPS

D = 16


def _pairs(centres: torch.Tensor, weights: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    labels = torch.multinomial(weights, max(n, 1), replacement=True, generator=g)[:n]
    image = centres[labels] + 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64)
    text = centres[labels] + 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return image, text


def _pool_and_target(n: int, share: float, seed: int) -> tuple[PairFeatures, PairFeatures]:
    """A pool whose ``share`` of pairs come from the target domain's 5 concepts (long-tailed, as a web pool holds
    them) and the rest from 10 other concepts; the target set is 64 pairs of the target concepts, balanced."""
    g = torch.Generator().manual_seed(seed)
    target_centres = torch.randn(5, D, generator=g, dtype=torch.float64)
    other_centres = torch.randn(10, D, generator=g, dtype=torch.float64)
    n_target = round(share * n)
    ti, tt = _pairs(target_centres, 0.6 ** torch.arange(5, dtype=torch.float64), n_target, g)
    oi, ot = _pairs(other_centres, torch.ones(10, dtype=torch.float64), n - n_target, g)
    si, st = _pairs(target_centres, torch.ones(5, dtype=torch.float64), 64, g)
    pool = PairFeatures(torch.arange(n), torch.cat([ti, oi]), torch.cat([tt, ot]))
    return pool, PairFeatures(torch.arange(64), si, st)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("share", [0.0, 0.13, 0.5, 0.8, 1.0])
def test_the_target_share_estimate_is_within_a_tenth_of_the_true_share(share):
    for seed in range(3):
        pool, target = _pool_and_target(2048, share, seed)
        estimate = estimate_target_share(_unit(pool.image), _unit(pool.text), _unit(target.image),
                                         _unit(target.text), beta=0.5)  # fmt: skip
        assert abs(estimate.share - share) < 0.1, (share, seed, estimate)
        assert 0.0 <= estimate.share <= 1.0


def test_the_estimate_streams_the_pool_in_chunks_with_the_same_result():
    pool, target = _pool_and_target(1000, 0.4, seed=5)
    args = (_unit(pool.image), _unit(pool.text), _unit(target.image), _unit(target.text))
    assert estimate_target_share(*args, beta=0.5, chunk=64) == estimate_target_share(*args, beta=0.5)


def _endpoint() -> EndPoint:
    eye = torch.eye(D, dtype=torch.float64)
    return EndPoint(eye, eye.clone(), torch.tensor(2.5, dtype=torch.float64))


def test_auto_alpha_is_the_papers_without_the_target_and_falls_as_the_pool_becomes_the_target_domain():
    ep = _endpoint()
    common = dict(components="plausibility", noise_adaptive=False, sketch_dim=None, bank_size=512,
                  curvature_samples=512, seed=1, reference_steps=5)  # fmt: skip
    alphas = {}
    for share in (0.0, 0.5, 0.9):
        pool, target = _pool_and_target(1024, share, seed=2)
        scorer = CHIPS(**common)  # alpha="auto" is the default
        scorer.prepare(ep, target, pool)
        metrics = scorer.round_metrics()
        assert set(metrics) == {"target_share", "alpha"}
        assert metrics["alpha"] == pytest.approx(adaptive_alpha(0.7, metrics["target_share"]))
        assert f"alpha={metrics['alpha']:.3g} (auto: target_share~{metrics['target_share']:.2f})" in scorer.summary()
        # the utility is the one of that alpha given as a number, exactly
        fixed = chips_scores(pool.image, pool.text, target.image, target.text, ep, alpha=metrics["alpha"], **common)
        torch.testing.assert_close(scorer.score(pool), fixed.utility)
        alphas[share] = metrics["alpha"]
    assert alphas[0.0] > 0.63 and alphas[0.9] < 0.15 and alphas[0.0] > alphas[0.5] > alphas[0.9]


def test_the_paper_preset_and_a_number_keep_their_alpha_and_a_bad_value_is_named():
    assert CHIPS().alpha == "auto"
    assert CHIPS(components="paper").alpha == 0.7  # the paper's formula, its curvature mix included
    assert CHIPS(components="paper", alpha=0.3).alpha == 0.3
    assert ChipsArguments().alpha == 0.7  # the functional forms compute the paper's formula
    pool, target = _pool_and_target(256, 0.5, seed=0)
    paper = CHIPS(components="paper", sketch_dim=None, bank_size=128, curvature_samples=128)
    paper.prepare(_endpoint(), target, pool)
    assert paper.round_metrics() == {} and paper.state.alpha == 0.7
    one = CHIPS(sketch_dim=None, bank_size=128, curvature_samples=128, reference_steps=2)
    one.prepare(_endpoint(), target.index(slice(0, 1)), pool)  # one target pair: nothing to compare it with
    assert one.state.alpha == 0.7 and "target_share" not in one.round_metrics()
    for bad in ("automatic", -0.1, 1.5, True):
        with pytest.raises(ValueError, match="alpha"):
            CHIPS(alpha=bad)
