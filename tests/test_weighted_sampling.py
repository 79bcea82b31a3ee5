"""``mode="weighted"`` draws by weight over any selection size: above ``torch.multinomial``'s 2**24 categories, in
proportion to the weights, the same for the same seed on every rank."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_chips.data.sampler import ScoredSubsetSampler
from lightning_chips.selection import Selection, select


def _sampler(selection: Selection, num_samples: int, *, seed: int, rank: int = 0, world: int = 2):
    sampler = ScoredSubsetSampler(len(selection), num_samples, seed=seed, selection_fn=lambda: selection)
    sampler.set_distributed(rank, world)
    return sampler


def test_weighted_sampling_over_more_than_2_to_the_24_pairs():
    """2**24 + 1 selected pairs, half the probability on the last one (past multinomial's reach): the draws are
    valid positions, the last pair takes half of them (8,000 draws: standard error 0.0056, tolerance 0.03), and the
    same seed gives the same sequence, whose every second element is rank 1's share."""
    n = 2**24 + 1
    ids = np.arange(n, dtype=np.int64)
    weights = np.full(n, 0.5 / (n - 1))
    weights[-1] = 0.5
    selection = Selection(ids, ids, weights, round=2, num_candidates=n)
    start = time.perf_counter()
    sequence = _sampler(selection, 4000, seed=1).global_sequence()
    assert time.perf_counter() - start < 10
    assert sequence.shape == (8000,) and sequence.min() >= 0 and sequence.max() == n - 1
    assert abs(float(np.mean(sequence == n - 1)) - 0.5) < 0.03
    assert len(np.unique(sequence[sequence != n - 1])) > 3000  # the rest spread over the other pairs
    np.testing.assert_array_equal(sequence, _sampler(selection, 4000, seed=1).global_sequence())
    np.testing.assert_array_equal(list(_sampler(selection, 4000, seed=1, rank=1)), sequence[1::2])
    assert not np.array_equal(sequence, _sampler(selection, 4000, seed=2).global_sequence())


def test_weighted_draws_follow_the_weights():
    """200,000 draws over weights 0.5 / 0.3 / 0.15 / 0.05 / 0: every frequency within 5 standard errors of its
    weight (at most 0.0056), a chi-square test does not reject them (p > 1e-3), and a zero weight is never drawn."""
    ids = np.array([10, 11, 12, 13, 14], dtype=np.int64)
    weights = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    selection = Selection(ids, np.array([100, 101, 102, 103, 104]), weights, round=1)
    sequence = _sampler(selection, 100_000, seed=7).global_sequence()
    counts = np.array([np.sum(sequence == i) for i in selection.indices])
    total = len(sequence)
    assert total == 200_000 and counts[-1] == 0
    standard_error = np.sqrt(weights * (1 - weights) / total)
    assert (np.abs(counts / total - weights) <= 5 * standard_error + 1e-12).all(), counts / total
    assert stats.chisquare(counts[:-1], weights[:-1] * total).pvalue > 1e-3


def test_select_weighted_weights_drive_the_draws():
    """The weights ``select(mode="weighted")`` gives (softmax of the standardised top-k scores) are what the
    sampler draws by."""
    rng = np.random.default_rng(3)
    selection = select(np.arange(50), rng.normal(size=50), count=8, mode="weighted", temperature=0.5)
    sequence = _sampler(selection, 50_000, seed=0, world=1).global_sequence()
    frequency = np.array([np.mean(sequence == i) for i in selection.indices])
    np.testing.assert_allclose(frequency, selection.weights, atol=5 * np.sqrt(0.25 / len(sequence)))


def test_draw_weighted_refuses_weights_it_cannot_draw_by():
    from lightning_chips.selection import draw_weighted

    generator = torch.Generator().manual_seed(0)
    for bad in ([0.0, 0.0], [1.0, -0.1], [1.0, float("nan")], [1.0, float("inf")], []):
        with pytest.raises(ValueError, match="finite, non-negative and not all zero"):
            draw_weighted(np.array(bad), 3, generator)
    assert draw_weighted(np.array([0.0, 2.0, 0.0]), 5, generator).tolist() == [1] * 5
