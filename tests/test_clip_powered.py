"""CLIP-powered selection: exact budget, closed form with fixed adapters, SGD mask close to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_chips.functional.clip_powered import clip_powered_scores, clip_powered_select


def _data(n=200, e=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = F.normalize(torch.randn(classes, e, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = F.normalize(prompts[labels] + 0.7 * torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    return images, prompts, labels


def _reference_combined(images, prompts, labels, k=50):
    """SAS / SDS / c from the formulas, with identity adapters."""
    sas = (images * prompts[labels]).sum(1)
    sds = torch.zeros(len(images), dtype=torch.float64)
    for i in range(len(images)):
        same = [j for j in range(len(images)) if labels[j] == labels[i] and j != i]
        dists = sorted(1.0 - float(images[i] @ images[j]) for j in same)
        sds[i] = sum(dists[: min(k - 1, len(same))]) / min(k - 1, len(same))
    norm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
    sas, sds = norm(sas), norm(sds)
    return sas / sas.mean() + 0.1 * sds / sds.mean()


@pytest.mark.parametrize("budget", [1, 37, 200])
def test_exact_budget_and_closed_form_with_fixed_adapters(budget):
    images, prompts, labels = _data()
    chosen = clip_powered_select(images, prompts, labels, budget, train_adapters=False)
    assert len(chosen) == budget and len(set(chosen.tolist())) == budget
    combined = _reference_combined(images, prompts, labels)
    torch.testing.assert_close(clip_powered_scores(images, prompts, labels, train_adapters=False).combined, combined)
    expected = torch.argsort(combined, descending=True, stable=True)[:budget].sort().values
    assert torch.equal(chosen, expected)


def test_sgd_mask_returns_the_budget_and_agrees_with_the_closed_form():
    images, prompts, labels = _data()
    closed = set(clip_powered_select(images, prompts, labels, 60, train_adapters=False).tolist())
    sgd = clip_powered_select(images, prompts, labels, 60, train_adapters=False, optimizer="sgd")
    assert len(sgd) == 60
    assert len(closed & set(sgd.tolist())) / 60 >= 0.8


def test_trained_adapters_drop_mislabelled_samples():
    images, prompts, labels = _data(n=300, seed=1)
    noisy = labels.clone()
    flip = torch.arange(0, 300, 5)  # 20 % mislabelled
    noisy[flip] = (labels[flip] + 1) % 4
    chosen = set(clip_powered_select(images, prompts, noisy, 150, adapter_epochs=5).tolist())
    kept_mislabelled = len(chosen & set(flip.tolist()))
    assert kept_mislabelled < 0.2 * len(flip)
    with pytest.raises(ValueError, match="budget"):
        clip_powered_select(images, prompts, noisy, 0)
