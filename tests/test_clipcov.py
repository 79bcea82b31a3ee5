"""ClipCov against a naive implementation of its greedy, and as a scorer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_chips.adapters import EndPoint
from lightning_chips.features import PairFeatures
from lightning_chips.functional.clipcov import clipcov_order, clipcov_select, kmeans
from lightning_chips.scoring import ClipCov, build_scorer
from lightning_chips.selection import select


def _data(n=60, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (n,), generator=g)
    return x, y, labels


def _naive_order(x, y, labels):
    """The greedy written out pair by pair from the formula (docs/methods.md, ClipCov)."""
    order = {}
    for c in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if labels[i] == c]

        def sim(j, k):
            return max(0.0, float(x[j] @ y[k])) + max(0.0, float(x[k] @ y[j]))

        gain = {i: sum(sim(i, j) for j in members) + 2 * float(x[i] @ y[i]) for i in members}
        remaining = list(members)
        for position in range(len(members)):
            pick = max(remaining, key=lambda i: (gain[i], -i))
            order[pick] = position
            remaining.remove(pick)
            for j in remaining:
                gain[j] -= sim(j, pick)
    return torch.tensor([order[i] for i in range(len(labels))])


def test_greedy_order_matches_the_naive_reference():
    for seed in range(3):
        x, y, labels = _data(seed=seed)
        assert torch.equal(clipcov_order(x, y, labels), _naive_order(x, y, labels))


def test_select_keeps_proportional_quotas_of_first_picks():
    x, y, labels = _data(n=90)
    keep = clipcov_select(x, y, labels, budget=30)
    assert len(keep) == 30
    order = clipcov_order(x, y, labels)
    for c in range(3):
        n_c = int((labels == c).sum())
        picked = keep[labels[keep] == c]
        assert abs(len(picked) - 30 * n_c / 90) < 1
        assert set(order[picked].tolist()) == set(range(len(picked)))  # the first picks of the class


def test_scorer_topk_is_the_per_class_greedy_and_kmeans_is_seeded():
    x, y, labels = _data(n=90)
    ep = EndPoint(torch.eye(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64), torch.tensor(2.0))
    ids = torch.arange(90) * 7 + 3
    pool = PairFeatures(ids, x, y, labels)
    scorer = build_scorer("clipcov", classes="labels")
    assert isinstance(scorer, ClipCov)
    scorer.prepare(ep, None, pool)
    scores = torch.cat([scorer.score(b) for b in pool.batches(16)])
    chosen = set(select(ids.numpy(), scores.numpy(), count=30).ids.tolist())
    assert chosen == set(ids[clipcov_select(x, y, labels, 30)].tolist())
    a, b = kmeans(x, 3, seed=1), kmeans(x, 3, seed=1)
    assert torch.equal(a, b) and len(torch.unique(a)) == 3
    clustered = ClipCov(num_clusters=3)
    clustered.prepare(ep, None, PairFeatures(ids, x, y))
    assert clustered.score(PairFeatures(ids[:5], x[:5], y[:5])).shape == (5,)
