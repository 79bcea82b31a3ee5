"""Embedding-quality baselines (CLIPScore, negCLIPLoss, NormSim) against their formulas, and what they detect."""

from __future__ import annotations

import copy
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from lightning_chips import OpenCLIPModule, TwoDomainDataModule, TwoDomainPairs, resolve_adapter
from lightning_chips.data import clip_normalize
from lightning_chips.features import extract_features
from lightning_chips.functional import clip_score, negclip_loss, normsim
from lightning_chips.scoring import CHIPS, CLIPScore, NegCLIPLoss, NormSim, build_scorer

from .conftest import TINY_VIT


def _embeddings(n: int, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    return x, y


def test_negclip_with_one_full_batch_is_minus_tau_times_the_clip_loss():
    x, y = _embeddings(50)
    tau = 0.07
    logits = x @ y.T / tau
    target = torch.arange(50)
    loss = 0.5 * (
        F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    )
    torch.testing.assert_close(negclip_loss(x, y, temperature=tau, batch_size=64, repeats=1), -tau * loss, atol=1e-6,
                               rtol=0)  # fmt: skip


def test_negclip_random_batching_is_seeded_and_unbiased():
    """With N = 9 and batches of 3, a pair's batch-mates are a uniform 2-subset of the other 8: the average over
    many random partitions converges to the exact mean over all 28 subsets."""
    x, y = _embeddings(9, seed=1)
    tau = 0.1
    a = negclip_loss(x, y, temperature=tau, batch_size=3, repeats=5, seed=3)
    assert torch.equal(a, negclip_loss(x, y, temperature=tau, batch_size=3, repeats=5, seed=3))
    assert not torch.equal(a, negclip_loss(x, y, temperature=tau, batch_size=3, repeats=5, seed=4))
    exact = torch.zeros(9, dtype=torch.float64)
    for i in range(9):
        others = [j for j in range(9) if j != i]
        values = []
        for mates in itertools.combinations(others, 2):
            idx = [i, *mates]
            sims = x[idx] @ y[idx].T
            values.append(
                sims[0, 0] - 0.5 * tau * (torch.logsumexp(sims[0] / tau, 0) + torch.logsumexp(sims[:, 0] / tau, 0))
            )
        exact[i] = torch.stack(values).mean()
    estimate = negclip_loss(x, y, temperature=tau, batch_size=3, repeats=3000, seed=0)
    torch.testing.assert_close(estimate, exact, atol=5e-3, rtol=0)


def test_normsim_formulas():
    x, _ = _embeddings(30, seed=2)
    t, _ = _embeddings(7, seed=3)
    sims = x @ t.T
    torch.testing.assert_close(normsim(x, t, p=2), sims.square().sum(1).sqrt())
    torch.testing.assert_close(normsim(x, t, p=float("inf")), sims.abs().max(1).values)
    sigma = t.T @ t / len(t)
    torch.testing.assert_close(normsim(x, t, p=2) ** 2, len(t) * ((x @ sigma) * x).sum(1))
    torch.testing.assert_close(normsim(x, t, p=2, chunk_size=3), normsim(x, t, p=2))
    with pytest.raises(ValueError, match="p = 2"):
        normsim(x, t, p=1)


def test_clip_score_is_the_pair_cosine():
    x, y = _embeddings(10)
    torch.testing.assert_close(clip_score(x, y), F.cosine_similarity(x, y))


@pytest.fixture(scope="module")
def pretrained():
    """A tiny CLIP pretrained briefly on built-in data with 30 % mismatched captions, and a scored test pool.

    10 epochs (500 steps): with 6, CLIPScore's clean-vs-mismatched AUROC was 0.96 at this seed but 0.79-0.80 with
    seeds 1 and 2 (model and data); with 10 it is 0.97 / 0.945 / 0.944 (negCLIPLoss 0.98 / 0.95 / 0.95).
    """
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3, warmup_steps=10)
    data = TwoDomainDataModule(num_train=3200, num_val=64, target_fraction=0.3, noise_fraction=0.3, batch_size=64)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    common = dict(tokenizer=module.get_tokenizer(), transform=clip_normalize())
    pool = TwoDomainPairs(1000, target_fraction=0.3, noise_fraction=0.3, split="test", **common)
    target = TwoDomainPairs(64, target_fraction=1.0, split="val", **common)
    adapter = resolve_adapter(module)
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=250)  # noqa: E731
    return adapter, pool, extract_features(adapter, loader(pool)), extract_features(adapter, loader(target))


def _auroc(positive: torch.Tensor, scores: torch.Tensor) -> float:
    return float(binary_auroc(scores.double(), positive.long()))


@pytest.mark.parametrize("name", ["clipscore", "negclip"])
def test_alignment_scores_rank_clean_pairs_above_mismatched_ones(pretrained, name):
    adapter, pool, pool_f, target_f = pretrained
    scorer = build_scorer(name, **({"batch_size": 256} if name == "negclip" else {}))
    scorer.prepare(adapter.endpoint(), target_f, pool_f)
    scores = torch.cat([scorer.score(b) for b in pool_f.batches(128)])
    assert _auroc(torch.as_tensor(~pool.noisy), scores) >= 0.9


@pytest.mark.parametrize("components", [("alignment",), None], ids=["alignment", "paper-utility"])
def test_chips_prefers_clean_target_domain_pairs(pretrained, components):
    """CHIPS scores usefulness for the target, not pair quality: clean general-domain pairs rank low too, so its
    clean-vs-mismatched AUROC over a mixed pool is low (0.58-0.61 measured). What it must do: rank clean target pairs
    above clean general ones, and clean target pairs above mismatched target pairs.

    Measured over three fixture seeds (0, 1, 2; model and data) at 10 epochs: clean target vs clean general 0.985 /
    0.999 / 0.998; clean vs mismatched within the target domain 0.907 / 0.864 / 0.874 (CLIPScore there: 0.975 /
    0.942 / 0.962). No bank size, solver, alpha, sketch dimension or damping tried reached 0.9 on all three seeds
    (best: the sketch with 100x damping, 0.923 / 0.872 / 0.875), so the within-target bound stays at 0.8. Checked
    for the alignment alone and for the paper's whole utility (``CHIPS()``: 0.876 / 0.841 / 0.842 within the
    target domain)."""
    adapter, pool, pool_f, target_f = pretrained
    scorer = CHIPS(bank_size=256, components="paper" if components is None else components, alpha=0.7)
    scorer.prepare(adapter.endpoint(), target_f, pool_f)
    scores = scorer.score(pool_f)
    clean, target = torch.as_tensor(~pool.noisy), torch.as_tensor(pool.domains == 1)
    assert _auroc(target[clean], scores[clean]) >= 0.9
    assert _auroc(clean[target], scores[target]) >= 0.8


def test_chips_with_plausibility_ranks_clean_target_pairs_above_mismatched_ones(pretrained):
    """The plausibility weight (ours) is what the paper's product lacks: within the target domain the paper's
    utility separates clean from mismatched pairs at 0.876 / 0.841 / 0.842 on fixture seeds 0 / 1 / 2, with the
    weight at 0.959 / 0.917 / 0.954; it must not cost the clean-target-over-clean-general ranking (0.98-0.99)."""
    from lightning_chips.scoring import ROBUST_COMPONENTS

    adapter, pool, pool_f, target_f = pretrained
    clean, target = torch.as_tensor(~pool.noisy), torch.as_tensor(pool.domains == 1)
    within = {}
    for name, components in (("paper", None), ("robust", ROBUST_COMPONENTS)):
        scorer = CHIPS(bank_size=256, alpha=0.7, **({"components": "paper"} if components is None else
                                          {"components": components, "noise_adaptive": False}))  # fmt: skip
        scorer.prepare(adapter.endpoint(), target_f, pool_f)
        scores = scorer.score(pool_f)
        within[name] = _auroc(clean[target], scores[target])
        assert _auroc(target[clean], scores[clean]) >= 0.9
    assert within["robust"] >= 0.9
    assert within["robust"] > within["paper"] + 0.03


def test_scorers_stream_and_look_up_by_id(pretrained):
    adapter, pool, pool_f, target_f = pretrained
    ep = adapter.endpoint()
    negclip = NegCLIPLoss(batch_size=256, repeats=3)
    negclip.prepare(ep, None, pool_f.index(slice(0, 600)))
    streamed = torch.cat([negclip.score(b) for b in pool_f.batches(100)])
    x, y = ep.embed_image(pool_f.image), ep.embed_text(pool_f.text)
    torch.testing.assert_close(streamed[:600], negclip_loss(x[:600], y[:600], batch_size=256, repeats=3).float())
    # pairs outside the prepared sample get a finite score that does not depend on the scoring batch
    alone = torch.cat([negclip.score(b) for b in pool_f.index(slice(600, 1000)).batches(7)])
    torch.testing.assert_close(alone, streamed[600:])
    assert torch.isfinite(alone).all()

    normsim_inf = NormSim()
    normsim_inf.prepare(ep, target_f, pool_f)
    torch.testing.assert_close(normsim_inf.score(pool_f), normsim(x, ep.embed_image(target_f.image), p=math.inf))
    with pytest.raises(ValueError, match="target"):
        NormSim().prepare(ep, None, pool_f)
    clip = CLIPScore()
    clip.prepare(ep, None, pool_f)
    torch.testing.assert_close(clip.score(pool_f), clip_score(x, y))
    assert isinstance(build_scorer("normsim", p=2.0), NormSim)
    with pytest.raises(ValueError):
        NormSim(p=3)


def test_chain_keeps_the_negclip_top_then_ranks_by_normsim(pretrained):
    from lightning_chips.scoring import Chain
    from lightning_chips.selection import select

    adapter, pool, pool_f, target_f = pretrained
    ep = adapter.endpoint()
    chain = Chain(NegCLIPLoss(batch_size=256), NormSim(), keep_fraction=0.3)
    chain.prepare(ep, target_f, pool_f)
    scores = torch.cat([chain.score(b) for b in pool_f.batches(128)])
    chosen = set(select(pool_f.ids.numpy(), scores.numpy(), fraction=0.2).ids.tolist())
    # the reference recipe, computed directly
    x, y = ep.embed_image(pool_f.image), ep.embed_text(pool_f.text)
    neg = negclip_loss(x, y, batch_size=256)
    top30 = torch.argsort(neg, descending=True)[:300]
    ns = normsim(x[top30], ep.embed_image(target_f.image), p=math.inf)
    expected = set(pool_f.ids[top30[torch.argsort(ns, descending=True)[:200]]].tolist())
    assert chosen == expected
