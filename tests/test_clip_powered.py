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


def test_scorer_is_the_closed_form_and_runs_in_a_selection_fit(tmp_path):
    import copy

    import lightning.pytorch as pl
    import numpy as np

    from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
    from lightning_chips.adapters import EndPoint
    from lightning_chips.data import CLASSNAMES
    from lightning_chips.features import PairFeatures
    from lightning_chips.scoring import ClipCov, ClipPowered, RoundContext, build_scorer

    from .conftest import TINY_VIT

    # Scorer level: with identity end point and a fixed text encoder it equals the functional closed form.
    images, prompts, labels = _data()
    ep = EndPoint(torch.eye(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64), torch.tensor(2.0))
    scorer = build_scorer("clip_powered", classnames=["a", "b", "c", "d"], templates=["{}"], train_adapters=False)
    assert isinstance(scorer, ClipPowered)
    encode = lambda names: prompts[["abcd".index(n) for n in names]]  # noqa: E731
    ids = torch.arange(len(images)) + 100
    scorer.prepare(ep, None, PairFeatures(ids, images, images, labels), RoundContext(text_encoder=encode))
    expected = clip_powered_scores(images, prompts, labels, train_adapters=False).combined
    torch.testing.assert_close(torch.cat([scorer.score(b) for b in PairFeatures(ids, images, images).batches(33)]),
                               expected)  # fmt: skip
    with pytest.raises(ValueError, match="set-level"):
        scorer.score(PairFeatures(ids[:2] + 10_000, images[:2], images[:2]))

    # In a fit: zero-shot pseudo-labels over both domains' class names, through the callback's text encoder.
    pl.seed_everything(0)
    names = list(CLASSNAMES["general"]) + list(CLASSNAMES["target"])
    for chosen in (
        ClipPowered(names, labels="zeroshot", adapter_epochs=1),
        ClipCov(classes="zeroshot", classnames=names),
    ):
        data = ScoredSubsetDataModule(TwoDomainPairs(120), batch_size=8, steps_per_round=2)
        save = tmp_path / type(chosen).__name__
        callback = DataSelectionCallback(chosen, fraction=0.25, every_n_epochs=1, save_dir=str(save))
        pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(
            OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT)), datamodule=data)  # fmt: skip
        rounds = np.load(save / "round_0001.npz")
        assert rounds["selected"].sum() == 30


def test_without_class_names_it_clusters_and_ranks_mismatched_captions_low():
    """The default `ClipPowered()` needs no class names: k-means clusters of the captions (the annotation), each
    cluster's mean caption as its class prompt, then the closed form with the cluster labels (checked against it),
    and pairs whose caption belongs to other images score low."""
    from lightning_chips.adapters import EndPoint
    from lightning_chips.features import PairFeatures
    from lightning_chips.functional.clipcov import kmeans
    from lightning_chips.scoring import build_scorer

    g = torch.Generator().manual_seed(3)
    e, n, classes = 8, 300, 4
    centers = F.normalize(torch.randn(classes, e, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(n) % classes
    mismatched = torch.arange(n) % 10 == 0
    caption_labels = torch.where(mismatched, (labels + 1) % classes, labels)
    images = centers[labels] + 0.15 * torch.randn(n, e, generator=g, dtype=torch.float64)
    texts = centers[caption_labels] + 0.15 * torch.randn(n, e, generator=g, dtype=torch.float64)
    identity = EndPoint(torch.eye(e, dtype=torch.float64), torch.eye(e, dtype=torch.float64), torch.tensor(2.0))
    pool = PairFeatures(torch.arange(n), images, texts)
    scorer = build_scorer("clip_powered", num_clusters=classes, train_adapters=False)
    scorer.prepare(identity, None, pool)
    scores = scorer.score(pool)
    x, y = F.normalize(images, dim=1), F.normalize(texts, dim=1)
    clusters = kmeans(y, classes, seed=0)
    prompts = F.normalize(torch.zeros(classes, e, dtype=torch.float64).index_add_(0, clusters, y), dim=1)
    expected = clip_powered_scores(x, prompts, clusters, train_adapters=False).combined
    torch.testing.assert_close(scores.double(), expected.to(scores.device).double())
    assert float(scores[mismatched].mean()) < float(scores[~mismatched].quantile(0.1))
    with pytest.raises(ValueError, match="labels='kmeans'"):
        build_scorer("clip_powered", labels="zeroshot")
