"""TracIn under DDP keeps the history of the whole pool on every rank, so a fit resumed from a checkpoint scores
its later rounds like the uninterrupted fit (2 CPU processes with gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_chips.features import PairFeatures
from lightning_chips.scoring import Chain, CLIPScore, Intersect, RoundContext, TracIn

from .test_chips import _problem

SCRIPT = Path(__file__).parent / "scripts" / "ddp_tracin.py"
POOL = 96  # the script's pool
EPOCHS = 4  # one selection round per epoch


def _fit(out: Path, scorer: str, ckpt_path: Path | None = None) -> list[dict]:
    out.mkdir(parents=True)
    command = [sys.executable, str(SCRIPT), str(out), "2", str(EPOCHS), scorer]
    result = subprocess.run(command + ([str(ckpt_path)] if ckpt_path else []), capture_output=True, text=True,
                            timeout=400, cwd=out)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["tracin", "chain"])
def test_a_resumed_ddp_fit_scores_tracin_rounds_like_the_uninterrupted_fit(tmp_path, scorer):
    """Each rank scores half of the pool, yet both hold the running totals of every pair (the engine hands the
    gathered scores to ``end_round``), so the checkpoint saved from rank 0 restores all of them: rounds 2 and 3 of
    a fit resumed after round 1 give the uninterrupted fit's scores. ``chain`` ranks by TracIn inside a Chain, whose
    ``end_round`` gathers TracIn's own scores (its own score does not hold them)."""
    full = _fit(tmp_path / "full", scorer)
    assert [rank["rounds"] for rank in full] == [EPOCHS, EPOCHS]
    assert len(full[0]["history_ids"]) == POOL and full[0]["history_ids"] == full[1]["history_ids"]
    # a round runs at the end of the epoch before the one it selects for, so the checkpoint of epoch 0 is taken
    # after round 1: the resumed fit runs rounds 2 and 3 from the history that checkpoint holds
    resumed = _fit(tmp_path / "resume", scorer, ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    assert full[0]["history_ids"] == resumed[0]["history_ids"] == resumed[1]["history_ids"]
    rounds = sorted(path.name for path in (tmp_path / "resume" / "rounds").glob("round_*.npz"))
    assert rounds == ["round_0002.npz", "round_0003.npz"]
    for r in range(2, EPOCHS):
        with (
            np.load(tmp_path / "full" / "rounds" / f"round_{r:04d}.npz") as a,
            np.load(tmp_path / "resume" / "rounds" / f"round_{r:04d}.npz") as b,
        ):
            np.testing.assert_array_equal(b["ids"], a["ids"])
            assert len(a["ids"]) == POOL
            np.testing.assert_array_equal(b["scores"], a["scores"], err_msg=f"round {r}")
            np.testing.assert_array_equal(b["selected"], a["selected"])


def _features(n: int = 60):
    pool_v, pool_t, target_v, target_t, ep = _problem(n=n, t=10, d_v=12, d_t=9, e=16)
    ids = torch.arange(1000, 1000 + n)
    return PairFeatures(ids, pool_v, pool_t), PairFeatures(torch.arange(10), target_v, target_t), ep


@pytest.mark.parametrize("composite", ["chain", "intersect"])
def test_a_composite_hands_its_tracin_part_the_parts_own_scores_at_end_round(composite):
    """The engine gives ``end_round`` the composite's scores, where a filtered pair is ``TracIn - 1e12`` (and a
    filter's scores are absent); the part must record its own totals, so the next round adds to them."""
    pool, target, ep = _features()
    tracin = TracIn(bank_size=32)
    scorer = (Chain(CLIPScore(), tracin, keep_fraction=0.5) if composite == "chain"
              else Intersect([tracin, CLIPScore()], [0.5, 0.5], rank_by=1))  # fmt: skip
    alone = TracIn(bank_size=32)
    totals = []
    for r in range(2):
        for s in (scorer, alone):
            s.prepare(ep, target, pool, RoundContext(round=r, learning_rate=0.5))
        combined = torch.cat([scorer.score(b).float().cpu() for b in pool.batches(16)])
        own = torch.cat([alone.score(b).float().cpu() for b in pool.batches(16)])
        assert bool((combined < -1e11).any())  # some pairs are filtered out
        scorer.end_round(pool.ids, combined)  # what the engine does, with the composite's scores
        alone.end_round(pool.ids, own)
        totals.append(own)
        torch.testing.assert_close(tracin.state_dict()["totals"], alone.state_dict()["totals"], rtol=0, atol=0)
    torch.testing.assert_close(totals[1], 2 * totals[0], rtol=1e-6, atol=1e-7)  # round 1 added to round 0
