"""Dot, TracIn and TRAK in the end-point subspace against dattri (identity projection) and their formulas."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_chips.adapters import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional import bank_loss, bank_stats
from lightning_chips.functional.influence import influence_prepare, influence_score_batch, tracin_scores, trak_scores
from lightning_chips.scoring import TRAK, Dot, RoundContext, TracIn, build_scorer

from .test_chips import _problem


def _dattri():
    """dattri's attributors; only the tests that compare with dattri skip without it."""
    pytest.importorskip("dattri")
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    return TracInAttributor, TRAKAttributor, AttributionTask


# dattri applies its default random projection (512 dims) unless told otherwise: `projector_kwargs=None` does not
# disable it. The identity projection makes the comparison exact.
IDENTITY = {"proj_type": "identity"}


class Head(nn.Module):
    """The end point as a module, so dattri can take per-sample gradients of its parameters."""

    def __init__(self, ep: EndPoint) -> None:
        super().__init__()
        self.image_proj = nn.Parameter(ep.image_proj.clone())
        self.text_proj = nn.Parameter(ep.text_proj.clone())
        self.logit_scale = nn.Parameter(ep.logit_scale.clone())


def _setup(n=60, t=4, seed=0):
    pool_v, pool_t, target_v, target_t, ep = _problem(seed=seed, n=n, t=t, d_v=6, d_t=5, e=8)
    # Bank = the whole pool (bank_size >= N), each pool pair excluded from its own negatives.
    bank_x, bank_y = ep.embed_image(pool_v), ep.embed_text(pool_t)
    own = torch.eye(n, dtype=torch.bool)
    none = torch.zeros(t, n, dtype=torch.bool)

    def loss_func(params, data):
        hv, ht, ex = data
        endpoint = EndPoint(params["image_proj"], params["text_proj"], params["logit_scale"])
        return bank_loss(hv[None], ht[None], endpoint, bank_x, bank_y, exclude=ex[None])[0]

    def correct_probability(params, data):  # dattri calls it on whole batches and on single samples
        hv, ht, ex = data
        single = hv.dim() == 1
        if single:
            hv, ht, ex = hv[None], ht[None], ex[None]
        endpoint = EndPoint(params["image_proj"], params["text_proj"], params["logit_scale"])
        stats = bank_stats(hv, ht, endpoint, bank_x, bank_y, exclude=ex)
        p_corr = 0.5 * (stats.p[:, 0] + stats.q[:, 0])
        return p_corr[0] if single else p_corr

    head = Head(ep)
    task = _dattri()[2](loss_func=loss_func, model=head, checkpoints=head.state_dict())
    train = DataLoader(TensorDataset(pool_v, pool_t, own), batch_size=16, shuffle=False)
    test = DataLoader(TensorDataset(target_v, target_t, none), batch_size=16, shuffle=False)
    return pool_v, pool_t, target_v, target_t, ep, task, train, test, correct_probability


def _ours_per_target(method, pool_v, pool_t, target_v, target_t, ep, **kwargs):
    columns = []
    for j in range(len(target_v)):
        state = influence_prepare(ep, target_v[j : j + 1], target_t[j : j + 1], pool_v, pool_t, method=method,
                                  bank_size=10_000, train_samples=10_000, **kwargs)  # fmt: skip
        columns.append(influence_score_batch(state, pool_v, pool_t, torch.arange(len(pool_v))))
    return torch.stack(columns, dim=1)


def _assert_rank_agreement(ours, theirs):
    for j in range(ours.shape[1]):
        rho = spearmanr(ours[:, j].numpy(), theirs[:, j].double().numpy())[0]
        assert rho >= 0.999, (j, rho)


def test_dot_and_tracin_agree_with_dattri():
    pool_v, pool_t, target_v, target_t, ep, task, train, test, _ = _setup()
    lr = 0.3
    attributor = _dattri()[0](task=task, weight_list=torch.tensor([lr]), normalized_grad=False,
                                  projector_kwargs=IDENTITY)  # fmt: skip
    theirs = attributor.attribute(train, test)
    ours = _ours_per_target("dot", pool_v, pool_t, target_v, target_t, ep)
    _assert_rank_agreement(ours, theirs)
    torch.testing.assert_close(lr * ours, theirs.double(), rtol=1e-4, atol=1e-6)
    # TracIn over one checkpoint is lr x Dot (mean target gradient).
    tracin = tracin_scores([(ep, lr)], pool_v, pool_t, target_v, target_t, bank_size=10_000)
    torch.testing.assert_close(tracin, lr * ours.mean(1))


def test_trak_agrees_with_dattri_with_identity_projection():
    pool_v, pool_t, target_v, target_t, ep, task, train, test, correct_probability = _setup()
    lam = 0.05
    attributor = _dattri()[1](task=task, correct_probability_func=correct_probability, projector_kwargs=IDENTITY,
                                regularization=lam)  # fmt: skip
    attributor.cache(train)
    theirs = attributor.attribute(test)
    # dattri divides every gradient by sqrt(dim(theta)): its lambda is ours / dim(theta).
    ours = _ours_per_target("trak", pool_v, pool_t, target_v, target_t, ep, sketch_dim=None,
                            damping=lam * ep.num_parameters)  # fmt: skip
    _assert_rank_agreement(ours, theirs)
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-3, atol=1e-6)
    ensemble = trak_scores([ep], pool_v, pool_t, target_v, target_t, sketch_dim=None, damping=lam * ep.num_parameters,
                           bank_size=10_000, train_samples=10_000)  # fmt: skip
    torch.testing.assert_close(ensemble, ours.mean(1))


def test_tracin_scorer_accumulates_rounds_with_their_learning_rates():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=50, d_v=6, d_t=5, e=8)
    ids = torch.arange(50)
    pool, target = PairFeatures(ids, pool_v, pool_t), PairFeatures(ids[:12], target_v, target_t)
    ep2 = EndPoint(ep.image_proj * 1.1, ep.text_proj, ep.logit_scale + 0.2)
    scorer = build_scorer("tracin", bank_size=10_000)
    assert isinstance(scorer, TracIn)
    totals = []
    for r, (endpoint, lr) in enumerate([(ep, 0.5), (ep2, 0.25)]):
        scorer.prepare(endpoint, target, pool, RoundContext(round=r, learning_rate=lr))
        totals.append(torch.cat([scorer.score(b) for b in pool.batches(16)]))
    expected = tracin_scores([(ep, 0.5), (ep2, 0.25)], pool_v, pool_t, target_v, target_t, bank_size=10_000)
    torch.testing.assert_close(totals[1], expected)
    # The history survives a checkpoint.
    restored = TracIn(bank_size=10_000)
    restored.load_state_dict(scorer.state_dict())
    restored.prepare(ep2, target, pool, RoundContext(round=2, learning_rate=0.0))
    torch.testing.assert_close(restored.score(pool), expected)


def test_sketched_dot_approximates_exact_dot_and_errors_are_eager():
    pool_v, pool_t, target_v, target_t, ep = _problem(n=300, d_v=10, d_t=6, e=30)
    ids = torch.arange(300)
    pool, target = PairFeatures(ids, pool_v, pool_t), PairFeatures(ids[:12], target_v, target_t)
    exact, sketched = Dot(bank_size=64), Dot(bank_size=64, sketch_dim=2000)
    exact.prepare(ep, target, pool)
    sketched.prepare(ep, target, pool)
    assert spearmanr(exact.score(pool).numpy(), sketched.score(pool).numpy())[0] > 0.9
    with pytest.raises(ValueError, match="sketch_dim"):
        TRAK(sketch_dim=2)
    with pytest.raises(ValueError, match="target"):
        Dot().prepare(ep, None, pool)
