"""Intersect: the intersection of per-scorer top sets, ranked by one scorer, against the rule computed directly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_chips.features import PairFeatures
from lightning_chips.functional import clip_score, negclip_loss, normsim
from lightning_chips.scoring import (
    Chain,
    CLIPScore,
    Intersect,
    NegCLIPLoss,
    NormSim,
    RoundContext,
    TracIn,
    build_scorer,
)
from lightning_chips.selection import select

from .test_chips import _problem

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def _features(n: int = 400, seed: int = 0):
    pool_v, pool_t, target_v, target_t, ep = _problem(seed=seed, n=n, t=10, d_v=12, d_t=9, e=16)
    ids = torch.arange(1000, 1000 + n)  # ids are not positions
    return PairFeatures(ids, pool_v, pool_t), PairFeatures(torch.arange(10), target_v, target_t), ep


def _top_set(values: np.ndarray, fraction: float) -> set[int]:
    keep = max(1, round(fraction * len(values)))
    return set(np.argsort(-values, kind="stable")[:keep].tolist())


def _reference(pool, target, ep):
    """The three scores of the pool, computed from their formulas (not through the scorers)."""
    x, y = ep.embed_image(pool.image), ep.embed_text(pool.text)
    return {
        "clip": clip_score(x, y).numpy(),
        "normsim": normsim(x, ep.embed_image(target.image), p=math.inf).numpy(),
        "negclip": negclip_loss(x, y, temperature=0.05, batch_size=64, repeats=2, seed=0).numpy(),
    }


@pytest.mark.parametrize(("fractions", "rank_by"), [((0.5, 0.6, 0.7), -1), ((0.4, 1.0, 0.8), 0), ((0.3, 0.3, 1.0), 1)])
def test_intersect_keeps_every_top_set_and_ranks_by_the_chosen_scorer(fractions, rank_by):
    pool, target, ep = _features()
    scorer = Intersect(
        [CLIPScore(), NegCLIPLoss(temperature=0.05, batch_size=64, repeats=2), NormSim()], list(fractions),
        rank_by=rank_by,
    )  # fmt: skip
    scorer.prepare(ep, target, pool)
    scores = torch.cat([scorer.score(b) for b in pool.batches(37)]).numpy()

    ref = _reference(pool, target, ep)
    columns = [ref["clip"], ref["negclip"], ref["normsim"]]
    survivors = set.intersection(*(_top_set(c, f) for c, f in zip(columns, fractions, strict=True)))
    ranking = columns[rank_by]
    assert 0 < len(survivors) < len(pool)
    assert scorer.kept_in_sample == len(survivors)
    inside = np.array(sorted(survivors))
    outside = np.setdiff1d(np.arange(len(pool)), inside)
    # every survivor ranks above every other pair, and survivors keep the rank_by score (its order)
    assert scores[inside].min() > scores[outside].max()
    np.testing.assert_allclose(scores[inside], ranking[inside], rtol=1e-6)
    np.testing.assert_allclose(scores[outside] + 1e12, ranking[outside], atol=1e-3)
    # a budget inside the intersection selects the rank_by top of the survivors
    budget = len(survivors) // 2
    chosen = set(select(pool.ids.numpy(), scores, fraction=budget / len(pool)).ids.tolist())
    expected = inside[np.argsort(-ranking[inside])[:budget]]
    assert chosen == set(pool.ids[expected].tolist())


def test_thresholds_come_from_the_pool_sample_and_scores_stream():
    pool, target, ep = _features(n=600, seed=1)
    sample = pool.index(slice(0, 300))
    scorer = Intersect([CLIPScore(), NormSim()], [0.5, 0.5])
    scorer.prepare(ep, target, sample)
    ref = _reference(pool, target, ep)
    t_clip = np.sort(ref["clip"][:300])[::-1][149]
    t_norm = np.sort(ref["normsim"][:300])[::-1][149]
    kept = (ref["clip"] >= t_clip - 1e-12) & (ref["normsim"] >= t_norm - 1e-12)
    scores = torch.cat([scorer.score(b) for b in pool.batches(64)]).numpy()
    np.testing.assert_array_equal(scores > -1e11, kept)
    # a pair's score does not depend on its batch
    np.testing.assert_allclose(torch.cat([scorer.score(b) for b in pool.batches(7)]).numpy(), scores, rtol=1e-12)


def test_intersect_with_a_full_second_fraction_is_chain():
    pool, target, ep = _features(seed=2)
    chain = Chain(CLIPScore(), NormSim(), keep_fraction=0.3)
    inter = Intersect([CLIPScore(), NormSim()], [0.3, 1.0])
    for scorer in (chain, inter):
        scorer.prepare(ep, target, pool)
    torch.testing.assert_close(inter.score(pool), chain.score(pool))
    assert (
        inter.summary()
        == "Intersect(top 30% by CLIPScore, ranked by NormSim; 120/400 of the sample in the intersection)"
    )


def test_intersect_validates_eagerly_and_passes_round_state_on():
    with pytest.raises(ValueError, match="at least two scorers"):
        Intersect([CLIPScore()], [0.5])
    with pytest.raises(ValueError, match="one fraction per scorer"):
        Intersect([CLIPScore(), NormSim()], [0.5])
    with pytest.raises(ValueError, match=r"fractions\[1\] must be in \(0, 1\]"):
        Intersect([CLIPScore(), NormSim()], [0.5, 0.0])
    with pytest.raises(ValueError, match=r"fractions\[0\] must be in \(0, 1\]"):
        Intersect([CLIPScore(), NormSim()], [1.5, 0.5])
    with pytest.raises(ValueError, match="rank_by"):
        Intersect([CLIPScore(), NormSim()], [0.5, 0.5], rank_by=2)
    with pytest.raises(ValueError, match="not a lightning_chips Scorer"):
        Intersect([CLIPScore(), "normsim"], [0.5, 0.5])
    with pytest.raises(RuntimeError, match="before prepare"):
        Intersect([CLIPScore(), NormSim()], [0.5, 0.5]).score(_features()[0])
    assert not Intersect([CLIPScore(), NegCLIPLoss()], [0.5, 0.5]).requires_target
    assert Intersect([CLIPScore(), NormSim()], [0.5, 0.5]).requires_target

    # round, learning rate and checkpoint state reach the inner scorers (TracIn keeps totals across rounds)
    pool, target, ep = _features(n=80)
    scorer = build_scorer("intersect", scorers=[CLIPScore(), TracIn(bank_size=32)], fractions=[0.5, 1.0])
    scorer.prepare(ep, target, pool, RoundContext(round=3, learning_rate=0.25))
    assert scorer.scorers[1].round == 3 and scorer.scorers[1].learning_rate == 0.25
    first = scorer.score(pool)
    restored = Intersect([CLIPScore(), TracIn(bank_size=32)], [0.5, 1.0])
    restored.load_state_dict(scorer.state_dict())
    restored.prepare(ep, target, pool, RoundContext(learning_rate=0.25))
    again, kept = restored.score(pool), first > -1e11
    assert torch.equal(again > -1e11, kept)
    torch.testing.assert_close(again[kept], 2 * first[kept])  # the restored history plus the same round again


def test_intersect_builds_from_yaml_like_other_scorers(tmp_path):
    from lightning_chips import DataSelectionCallback
    from lightning_chips.cli import build_cli

    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["scorer"] = yaml.safe_load(
        """
        class_path: lightning_chips.scoring.Intersect
        init_args:
          scorers:
            - class_path: lightning_chips.scoring.CLIPScore
            - class_path: lightning_chips.scoring.NegCLIPLoss
              init_args: {batch_size: 256}
            - class_path: lightning_chips.scoring.NormSim
              init_args: {p: 2.0}
          fractions: [0.5, 0.4, 1.0]
          rank_by: 0
        """
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, DataSelectionCallback)]
    scorer = callback.scorer
    assert isinstance(scorer, Intersect) and scorer.fractions == (0.5, 0.4, 1.0) and scorer.rank_by == 0
    assert [type(s) for s in scorer.scorers] == [CLIPScore, NegCLIPLoss, NormSim]
    assert scorer.scorers[1].batch_size == 256 and scorer.scorers[2].p == 2.0


def test_chain_checkpoints_its_inner_scorers_state():
    """A Chain ranking by TracIn keeps TracIn's totals of earlier rounds through state_dict (a resumed fit scores
    like the uninterrupted one)."""
    pool, target, ep = _features(n=80)
    scorer = Chain(CLIPScore(), TracIn(bank_size=32), keep_fraction=1.0)
    scorer.prepare(ep, target, pool, RoundContext(learning_rate=0.25))
    first = scorer.score(pool)
    restored = Chain(CLIPScore(), TracIn(bank_size=32), keep_fraction=1.0)
    restored.load_state_dict(scorer.state_dict())
    restored.prepare(ep, target, pool, RoundContext(learning_rate=0.25))
    torch.testing.assert_close(restored.score(pool), 2 * first)  # the restored round plus the same round again


def test_a_scorer_written_before_round_contexts_still_reads_the_round():
    """A user scorer with the three-argument ``prepare`` keeps working: callers pass the context, the scorer
    reads ``self.round`` / ``self.learning_rate`` from it."""
    from lightning_chips.scoring import Scorer

    class Legacy(Scorer):
        requires_target = False

        def prepare(self, endpoint, target, pool_sample) -> None:
            self.seen = (self.round, self.learning_rate)

        def score(self, batch):
            return torch.full((len(batch),), float(self.round))

    pool, target, ep = _features(n=20)
    legacy = Legacy()
    legacy.prepare(ep, None, pool, RoundContext(round=4, learning_rate=0.5))
    assert legacy.seen == (4, 0.5) and legacy.score(pool).eq(4).all()
    chain = Chain(CLIPScore(), Legacy(), keep_fraction=1.0)
    chain.prepare(ep, target, pool, RoundContext(round=2))
    assert chain.second.seen == (2, 1.0)
