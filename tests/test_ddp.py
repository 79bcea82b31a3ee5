"""DDP with 2 CPU processes (gloo) gives the single-process numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_validate.py"
SELECT_SCRIPT = Path(__file__).parent / "scripts" / "ddp_select.py"


def _run(tmp_path: Path, devices: int, batch_size: int) -> dict:
    out = tmp_path / f"ddp{devices}.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(batch_size)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.ddp
def test_contrastive_loss_gathers_negatives_across_ranks(tmp_path):
    """2 ranks x 16 pairs see the same 32 negatives as one process with 32 pairs, so val/loss is identical.

    Without cross-rank gathering each rank would see 16 negatives and the loss would be markedly lower.
    """
    single = _run(tmp_path, devices=1, batch_size=32)
    ddp = _run(tmp_path, devices=2, batch_size=16)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    local_only = _run(tmp_path, devices=1, batch_size=16)
    assert abs(local_only["val_loss"] - single["val_loss"]) > 0.05


CANDIDATES = "1.5,0.05,0.05"
"""Rounds 1 and 2 of the selection runs are candidate rounds: the top 1.5 x 75 of the last round, a 15-pair anchor
and 15 explored."""


def _select(tmp_path: Path, devices: int, batch_size: int, scorer: str) -> list[dict]:
    out = tmp_path / f"{scorer}{devices}"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(SELECT_SCRIPT), str(out), str(devices), str(batch_size), scorer, "1", CANDIDATES],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}_of{devices}.json").read_text()) for r in range(devices)]


@pytest.mark.ddp
def test_ranks_agree_on_the_selection_and_split_the_single_process_sequence(tmp_path):
    """2 ranks x batch 8 vs 1 process x batch 16, Random scorer (model-independent, so the runs select alike):
    every round both ranks hold the same selection, and per step the two ranks' batches are exactly the two
    halves (interleaved) of the single process's batch. Rounds 1 and 2 are candidate rounds (about half the pool
    encoded): the ranks read their shares of the candidates and agree on the same selection as one process."""
    rank0, rank1 = _select(tmp_path, 2, 8, "random")
    (single,) = _select(tmp_path, 1, 16, "random")
    assert set(rank0["selections"]) == {"0", "1", "2"}
    for epoch in ("0", "1", "2"):
        assert rank0["selections"][epoch] == rank1["selections"][epoch] == single["selections"][epoch]
        a, b, s = rank0["batches"][epoch], rank1["batches"][epoch], single["batches"][epoch]
        assert len(a) == len(b) == 24 and len(s) == 48
        interleaved = [x for pair in zip(a, b, strict=True) for x in pair]
        assert interleaved == s
        assert set(s) <= set(single["selections"][epoch])
    assert rank0["selections"]["0"] != rank0["selections"]["1"]  # a new random subset every round
    assert rank0["encoded"] == rank1["encoded"] == single["encoded"]
    assert rank0["encoded"][0] == 300 and all(e <= (1.5 * 0.25 + 0.05 + 0.05) * 300 for e in rank0["encoded"][1:])
    # the round files (rank 0's) hold the same scores, groups and galleries as the single process's
    for r in range(3):
        name = f"rounds/round_{r:04d}.npz"
        ddp, one = np.load(tmp_path / "random2" / name), np.load(tmp_path / "random1" / name)
        for key in (
            "ids",
            "scores",
            "selected",
            "group_fields",
            "group_values_0",
            "group_codes_0",
            "group_codes_1",
            "encoded",
            "pool_pairs",
        ):
            assert np.array_equal(ddp[key], one[key]), key
        assert len(np.unique(one["group_codes_1"])) == 2  # both noisy and clean pairs are in the pool
        ddp_gallery = np.load(tmp_path / "random2" / name.replace(".npz", "_gallery.npz"))
        one_gallery = np.load(tmp_path / "random1" / name.replace(".npz", "_gallery.npz"))
        for key in ("ids", "kinds", "thumbnails"):
            assert np.array_equal(ddp_gallery[key], one_gallery[key]), key


@pytest.mark.ddp
def test_chips_selection_is_identical_on_both_ranks(tmp_path):
    rank0, rank1 = _select(tmp_path, 2, 8, "chips")
    for epoch in ("0", "1", "2"):
        assert rank0["selections"][epoch] == rank1["selections"][epoch]
        assert len(rank0["selections"][epoch]) == 75  # round(0.25 * 300), candidate rounds too
        assert set(rank0["batches"][epoch]) | set(rank1["batches"][epoch]) <= set(rank0["selections"][epoch])
    assert rank0["encoded"] == rank1["encoded"] and max(rank0["encoded"][1:]) < 300


GRAD_SCRIPT = Path(__file__).parent / "scripts" / "ddp_grad_step.py"


def _step(tmp_path: Path, devices: int, gather_with_grad: bool):
    import torch

    out = tmp_path / f"weights{devices}_{int(gather_with_grad)}.pt"
    result = subprocess.run([sys.executable, str(GRAD_SCRIPT), str(out), str(devices), str(int(gather_with_grad))],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.ddp
def test_ddp_gradient_is_the_single_process_gradient_of_the_global_batch_with_gather_with_grad(tmp_path):
    """One SGD step on 2 ranks x 16 pairs gives the weights of one process on the 32 pairs (docs/selection.md,
    "Resuming and DDP"), because the loss back-propagates through the cross-rank gather; without it each rank's
    gradient misses the terms of its features as the other rank's negatives, and the weights differ."""
    import torch

    single = _step(tmp_path, 1, True)
    ddp = _step(tmp_path, 2, True)
    torch.testing.assert_close(ddp, single, rtol=0, atol=1e-6)
    without = _step(tmp_path, 2, False)
    assert (without - single).abs().max() > 100 * (ddp - single).abs().max() + 1e-5  # measurably different
