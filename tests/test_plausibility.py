"""The plausibility weight of CHIPS (docs/methods.md, CHIPS: plausibility): its parts against direct computations."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from lightning_chips.adapters import EndPoint
from lightning_chips.functional import adapt_endpoint, bank_rank, chips_prepare, chips_scores, plausibility_weight
from lightning_chips.functional.chips import COMPONENTS
from lightning_chips.functional.rounds import subsample
from lightning_chips.scoring import CHIPS, ROBUST_COMPONENTS


def _endpoint(seed: int = 0, d_v: int = 12, d_t: int = 10, e: int = 6) -> EndPoint:
    g = torch.Generator().manual_seed(seed)
    return EndPoint(torch.randn(d_v, e, generator=g, dtype=torch.float64),
                    torch.randn(d_t, e, generator=g, dtype=torch.float64),
                    torch.tensor(2.5, dtype=torch.float64))  # fmt: skip


def _features(n: int, seed: int, d_v: int = 12, d_t: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_v, generator=g, dtype=torch.float64), torch.randn(n, d_t, generator=g, dtype=torch.float64)


def test_bank_rank_counts_the_bank_entries_the_true_partner_beats():
    g = torch.Generator().manual_seed(1)
    x, y = (F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    bx, by = (F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    exclude = torch.zeros(7, 9, dtype=torch.bool)
    exclude[2, 4] = exclude[5, 0] = exclude[5, 8] = True
    expected = torch.empty(7, dtype=torch.float64)
    for i in range(7):
        pos = float(x[i] @ y[i])
        kept = [j for j in range(9) if not exclude[i, j]]
        i2t = sum(float(x[i] @ by[j]) < pos for j in kept)
        t2i = sum(float(bx[j] @ y[i]) < pos for j in kept)
        expected[i] = 0.5 * (i2t + t2i) / len(kept)
    torch.testing.assert_close(bank_rank(x, y, bx, by, exclude), expected)
    # a caption that fits its image better than every bank caption ranks 1; the worst fit ranks 0
    assert bank_rank(bx[:1], bx[:1], -bx[1:], -bx[1:]).item() == 1.0
    assert bank_rank(bx[:1], -bx[:1], bx[1:], bx[1:]).item() == 0.0


def test_plausibility_weight_is_the_power_of_the_best_rank():
    a, b = torch.tensor([0.2, 0.9, 0.5]), torch.tensor([0.8, 0.1, 0.5])
    torch.testing.assert_close(plausibility_weight([a, b], 10.0), torch.tensor([0.8, 0.9, 0.5]) ** 10)
    assert torch.equal(plausibility_weight([a], 0.0), torch.ones(3))  # gamma 0: no weight (a clean pool)
    with pytest.raises(ValueError, match="power"):
        plausibility_weight([a], -1.0)
    with pytest.raises(ValueError, match="at least one"):
        plausibility_weight([], 1.0)


def _clip_loss(ep: EndPoint, image: torch.Tensor, text: torch.Tensor) -> float:
    x, y = ep.embed_image(image), ep.embed_text(text)
    logits = ep.logit_scale.exp() * x @ y.T
    labels = torch.arange(len(x))
    return float(0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)))


def test_reference_adaptation_learns_the_target_and_leaves_the_model_alone():
    ep = _endpoint()
    before = [t.clone() for t in ep.tensors()]
    t_v, t_t = _features(16, 1)
    b_v, b_t = _features(40, 2)
    ref = adapt_endpoint(ep, t_v, t_t, b_v, b_t, steps=30, lr=1e-2)
    assert _clip_loss(ref, t_v, t_t) < 0.5 * _clip_loss(ep, t_v, t_t)
    for old, new in zip(before, ep.tensors(), strict=True):
        assert torch.equal(old, new)  # the scored model is untouched
    again = adapt_endpoint(ep, t_v, t_t, b_v, b_t, steps=30, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(ref.tensors(), again.tensors(), strict=True))  # deterministic
    same = adapt_endpoint(ep, t_v, t_t, b_v, b_t, steps=0)
    assert all(torch.equal(a, b) for a, b in zip(same.tensors(), ep.tensors(), strict=True))
    with pytest.raises(ValueError, match="steps"):
        adapt_endpoint(ep, t_v, t_t, b_v, b_t, steps=-1)


def test_plausibility_multiplies_the_paper_utility_by_the_documented_weight():
    ep = _endpoint()
    p_v, p_t = _features(60, 3)
    t_v, t_t = _features(8, 4)
    common = dict(sketch_dim=None, bank_size=20, curvature_samples=60, seed=5)
    paper = chips_scores(p_v, p_t, t_v, t_t, ep, **common)
    robust = chips_scores(p_v, p_t, t_v, t_t, ep, components=ROBUST_COMPONENTS, plausibility_power=7.0,
                          noise_adaptive=False, reference_steps=20, reference_lr=1e-2, **common)  # fmt: skip
    assert torch.equal(paper.plausibility, torch.ones(60, dtype=torch.float64))  # not computed for the paper
    for name in (*COMPONENTS, "utility"):
        if name != "utility":
            torch.testing.assert_close(getattr(robust, name), getattr(paper, name))
    torch.testing.assert_close(robust.utility, paper.utility * robust.plausibility)
    # w_P rebuilt from its definition: the bank rows chips_prepare draws, the reference adapted on them
    idx = subsample(60, 20, 5)
    ref = adapt_endpoint(ep, t_v, t_t, p_v[idx], p_t[idx], steps=20, lr=1e-2)
    exclude = torch.arange(60)[:, None] == idx[None, :]
    ranks = [bank_rank(m.embed_image(p_v), m.embed_text(p_t), m.embed_image(p_v[idx]), m.embed_text(p_t[idx]),
                       exclude) for m in (ep, ref)]  # fmt: skip
    torch.testing.assert_close(robust.plausibility, torch.maximum(*ranks) ** 7.0)
    # without a reference, only the scored model's rank counts
    alone = chips_scores(p_v, p_t, t_v, t_t, ep, components=ROBUST_COMPONENTS, reference_steps=0,
                         noise_adaptive=False, **common)  # fmt: skip
    torch.testing.assert_close(alone.plausibility, ranks[0] ** 10.0)


def test_mismatched_target_pairs_lose_plausibility_that_the_reference_restores():
    """Target-domain pairs the scored model cannot read: the reference (adapted to target pairs of the same
    concepts) ranks clean ones high and pairs with a swapped caption low."""
    g = torch.Generator().manual_seed(7)
    d, e, concepts = 16, 8, 12
    ep = EndPoint(torch.eye(d, e, dtype=torch.float64), torch.eye(d, e, dtype=torch.float64).flip(1),
                  torch.tensor(3.0, dtype=torch.float64))  # the two towers do not line up: no knowledge  # fmt: skip
    centers_v = torch.randn(concepts, d, generator=g, dtype=torch.float64)
    centers_t = torch.randn(concepts, d, generator=g, dtype=torch.float64)

    def pairs(labels: torch.Tensor, caption_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.1 * torch.randn(len(labels), 2, d, generator=g, dtype=torch.float64)
        return centers_v[labels] + noise[:, 0], centers_t[caption_labels] + noise[:, 1]

    target = pairs(torch.arange(60) % concepts, torch.arange(60) % concepts)
    labels = torch.arange(200) % concepts
    mismatched = torch.arange(200) % 4 == 0
    caption_labels = torch.where(mismatched, (labels + 1) % concepts, labels)
    pool = pairs(labels, caption_labels)
    scorer = CHIPS(sketch_dim=None, bank_size=100, curvature_samples=200, components=ROBUST_COMPONENTS,
                   reference_steps=100, reference_lr=1e-2, noise_adaptive=False)  # fmt: skip
    from lightning_chips.features import PairFeatures

    scorer.prepare(ep, PairFeatures(torch.arange(60), *target), PairFeatures(torch.arange(200), *pool))
    w = scorer.score_components(PairFeatures(torch.arange(200), *pool)).plausibility
    assert float(binary_auroc(w, (~mismatched).long())) >= 0.95  # 0.987 measured
    blind = CHIPS(sketch_dim=None, bank_size=100, curvature_samples=200, components=ROBUST_COMPONENTS,
                  reference_steps=0, noise_adaptive=False)  # fmt: skip
    blind.prepare(ep, PairFeatures(torch.arange(60), *target), PairFeatures(torch.arange(200), *pool))
    w0 = blind.score_components(PairFeatures(torch.arange(200), *pool)).plausibility
    assert float(w0[~mismatched].mean()) < 0.5 * float(w[~mismatched].mean())  # 0.10 vs 0.66: the model alone
    # cannot tell a clean target pair from a noisy one


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"plausibility_power": 0.0}, "plausibility_power"),
        ({"reference_steps": -1}, "reference_steps"),
        ({"reference_steps": 2.5}, "reference_steps"),
        ({"reference_lr": 0.0}, "reference_lr"),
        ({"relative_damping": 0.0}, "relative_damping"),
        ({"components": "robust"}, "components"),
        ({"noise_range": (0.2, 0.1)}, "noise_range"),
        ({"noise_range": (0.1, 1.5)}, "noise_range"),
        ({"noise_adaptive": "yes"}, "noise_adaptive"),
        ({"components": ("alignment", "noise")}, "components"),
        ({"sketch_layout": "dense"}, "sketch_layout"),
    ],
)
def test_bad_settings_are_refused_eagerly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CHIPS(**kwargs)


def test_relative_damping_is_the_same_theta_space_rule_for_both_solvers():
    """lambda = rho * trace(M_0) / k: the kernel solve reports it in theta-space (k = dim(theta)); the exact dense
    solve (k = dim(theta) too) uses the same lambda, so both give the same alignment for every rho."""
    ep = _endpoint(d_v=6, d_t=5, e=3)
    p_v, p_t = _features(40, 3, d_v=6, d_t=5)
    t_v, t_t = _features(5, 4, d_v=6, d_t=5)
    for rho in (1e-4, 1e-2, 1.0):
        common = dict(bank_size=20, curvature_samples=40, relative_damping=rho, components=("alignment",))
        dense = chips_prepare(ep, t_v, t_t, p_v, p_t, sketch_dim=None, **common)
        kernel = chips_prepare(ep, t_v, t_t, p_v, p_t, solver="kernel", **common)
        assert dense.damping == pytest.approx(kernel.damping, rel=1e-9)
        a = chips_scores(p_v, p_t, t_v, t_t, ep, sketch_dim=None, **common).alignment
        b = chips_scores(p_v, p_t, t_v, t_t, ep, solver="kernel", **common).alignment
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    damped = [chips_prepare(ep, t_v, t_t, p_v, p_t, sketch_dim=None, relative_damping=r, bank_size=20,
                            curvature_samples=40).damping for r in (1e-3, 1e-2)]  # fmt: skip
    assert damped[1] == pytest.approx(10 * damped[0])


def test_robust_components_are_the_paper_ones_plus_plausibility():
    assert ROBUST_COMPONENTS == (*COMPONENTS, "plausibility")
    assert CHIPS().components == ROBUST_COMPONENTS and CHIPS().noise_adaptive  # the recommended configuration
    assert CHIPS(components="paper").components == COMPONENTS  # the paper's formula, one argument away
    assert all(c in ROBUST_COMPONENTS for c in itertools.chain(COMPONENTS))
