"""Properties of ``ScoredSubsetSampler``: draws stay in the live selection, ranks split one global sequence,
seeding by (seed, round, epoch), coverage without replacement, weighted frequencies, argument checks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from lightning_chips.data.sampler import ScoredSubsetSampler
from lightning_chips.selection import Selection, select

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------
# helpers / strategies
# ----------------------------------------------------------------------------------------------------------------


def make_selection(pool_size: int, fraction: float, mode: str, seed: int, round_: int = 0) -> Selection:
    """A real selection over a pool whose ids differ from the dataset indices (ids = 1000 + 3 * index)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(pool_size)
    ids = 1000 + 3 * perm
    scores = rng.integers(0, 5, size=pool_size).astype(float)  # ties
    labels = rng.integers(0, 3, size=pool_size)
    return select(ids, scores, fraction=fraction, mode=mode, labels=labels, indices=perm, round=round_)


def make_sampler(pool_size, num_samples, *, seed=0, selection=None, world=1, rank=0, epoch=0, **kw):
    sampler = ScoredSubsetSampler(pool_size, num_samples, seed=seed, selection_fn=lambda: selection, **kw)
    sampler.set_distributed(rank, world)
    sampler.set_epoch(epoch)
    return sampler


def rank_sequences(pool_size, num_samples, world, **kw) -> list[list[int]]:
    return [list(make_sampler(pool_size, num_samples, world=world, rank=r, **kw)) for r in range(world)]


@st.composite
def scenarios(draw, modes=("topk", "weighted", "stratified", None)):
    pool_size = draw(st.integers(1, 200))
    mode = draw(st.sampled_from(modes))
    fraction = draw(st.floats(0.01, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    round_ = draw(st.integers(0, 20))
    selection = None if mode is None else make_selection(pool_size, fraction, mode, seed, round_)
    return dict(
        pool_size=pool_size,
        num_samples=draw(st.integers(1, 300)),
        world=draw(st.integers(1, 4)),
        seed=seed,
        epoch=draw(st.integers(0, 50)),
        selection=selection,
    )


def allowed(sc) -> set[int]:
    sel = sc["selection"]
    return set(range(sc["pool_size"])) if sel is None else set(sel.indices.tolist())


# ----------------------------------------------------------------------------------------------------------------
# membership, lengths, rank split
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(sc=scenarios())
def test_every_rank_draws_num_samples_from_the_selection(sc):
    seqs = rank_sequences(
        sc["pool_size"], sc["num_samples"], sc["world"], seed=sc["seed"], epoch=sc["epoch"], selection=sc["selection"]
    )
    ok = allowed(sc)
    for r, seq in enumerate(seqs):
        sampler = make_sampler(sc["pool_size"], sc["num_samples"], world=sc["world"], rank=r, selection=sc["selection"])
        assert len(sampler) == sc["num_samples"]
        assert len(seq) == sc["num_samples"]
        assert all(type(i) is int for i in seq)  # plain ints for the DataLoader
        assert set(seq) <= ok


@SETTINGS
@given(sc=scenarios())
def test_interleaved_ranks_reproduce_the_global_sequence(sc):
    world, n = sc["world"], sc["num_samples"]
    kw = dict(seed=sc["seed"], epoch=sc["epoch"], selection=sc["selection"])
    seqs = rank_sequences(sc["pool_size"], n, world, **kw)
    interleaved = np.empty(n * world, dtype=np.int64)
    for r, seq in enumerate(seqs):
        interleaved[r::world] = seq
    for r in range(world):
        glob = make_sampler(sc["pool_size"], n, world=world, rank=r, **kw).global_sequence()
        assert glob.shape == (n * world,)
        np.testing.assert_array_equal(interleaved, glob)
    # the union of the ranks is the single-process sequence of num_samples * world
    single = make_sampler(sc["pool_size"], n * world, world=1, rank=0, **kw)
    np.testing.assert_array_equal(single.global_sequence(), interleaved)
    assert list(single) == interleaved.tolist()


def test_ranks_take_disjoint_positions_of_one_sequence():
    sel = make_selection(50, 0.2, "topk", seed=1, round_=1)
    glob = make_sampler(50, 7, world=3, selection=sel, seed=5, epoch=2).global_sequence()
    for r in range(3):
        seq = list(make_sampler(50, 7, world=3, rank=r, selection=sel, seed=5, epoch=2))
        assert seq == glob[r::3].tolist()


def test_explicit_arguments_of_global_sequence():
    sel = make_selection(60, 0.5, "topk", seed=2, round_=3)
    sampler = make_sampler(60, 20, selection=None, seed=9, epoch=0)
    with_sel = make_sampler(60, 20, selection=sel, seed=9, epoch=4)
    np.testing.assert_array_equal(sampler.global_sequence(sel, 4), with_sel.global_sequence())
    assert list(with_sel) == sampler.global_sequence(sel, 4).tolist()


# ----------------------------------------------------------------------------------------------------------------
# before any selection
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection_fn", [None, lambda: None])
def test_before_any_selection_the_whole_pool_is_sampled(selection_fn):
    sampler = ScoredSubsetSampler(37, 100, seed=3, selection_fn=selection_fn)
    seq = list(sampler)
    assert len(seq) == 100
    assert sorted(seq[:37]) == list(range(37))  # a full pass first
    counts = Counter(seq)
    assert set(counts) == set(range(37))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_before_any_selection_small_epochs_are_distinct():
    seq = list(ScoredSubsetSampler(1000, 50, seed=0))
    assert len(set(seq)) == 50 and all(0 <= i < 1000 for i in seq)


# ----------------------------------------------------------------------------------------------------------------
# seeding
# ----------------------------------------------------------------------------------------------------------------


def _distinct_probability_is_negligible(sc) -> bool:
    """Whether two independent sequences of this scenario coincide with probability < 1e-9."""
    total = sc["num_samples"] * sc["world"]
    sel = sc["selection"]
    k = sc["pool_size"] if sel is None else len(sel)
    if sel is None or sel.weights is None:
        # the first min(total, k) positions are a uniformly random arrangement
        m = min(total, k)
        log_p = -sum(np.log(k - i) for i in range(m))
        return log_p < np.log(1e-9)
    collision = float((sel.weights**2).sum())
    return total * np.log(collision) < np.log(1e-9)


@SETTINGS
@given(sc=scenarios(), d_epoch=st.integers(1, 1000), d_round=st.integers(1, 100))
def test_same_seed_round_epoch_same_sequence_and_changes_otherwise(sc, d_epoch, d_round):
    kw = dict(pool_size=sc["pool_size"], num_samples=sc["num_samples"], world=sc["world"], seed=sc["seed"])
    base = make_sampler(selection=sc["selection"], epoch=sc["epoch"], **kw)
    again = make_sampler(selection=sc["selection"], epoch=sc["epoch"], **kw)
    seq = base.global_sequence()
    np.testing.assert_array_equal(seq, again.global_sequence())
    np.testing.assert_array_equal(seq, base.global_sequence())  # no hidden state between calls
    assert list(base) == list(again)

    assume(_distinct_probability_is_negligible(sc))
    other_epoch = make_sampler(selection=sc["selection"], epoch=sc["epoch"] + d_epoch, **kw)
    assert not np.array_equal(seq, other_epoch.global_sequence())
    if sc["selection"] is not None:
        sel = sc["selection"]
        moved = Selection(sel.ids, sel.indices, sel.weights, round=sel.round + d_round)
        other_round = make_sampler(selection=moved, epoch=sc["epoch"], **kw)
        assert not np.array_equal(seq, other_round.global_sequence())
    other_seed = make_sampler(selection=sc["selection"], epoch=sc["epoch"], **{**kw, "seed": sc["seed"] + 1})
    assert not np.array_equal(seq, other_seed.global_sequence())


def test_first_selection_changes_the_sequence_even_over_the_whole_pool():
    # a round-0 selection of every pair is not the "before any selection" stream
    everything = select(np.arange(40), np.zeros(40), fraction=1.0)
    before = make_sampler(40, 40, selection=None, seed=1).global_sequence()
    after = make_sampler(40, 40, selection=everything, seed=1).global_sequence()
    assert sorted(before.tolist()) == sorted(after.tolist()) == list(range(40))
    assert not np.array_equal(before, after)


def test_sequence_does_not_depend_on_the_global_torch_rng():
    sel = make_selection(100, 0.3, "weighted", seed=4)
    torch.manual_seed(0)
    a = make_sampler(100, 64, selection=sel, seed=2).global_sequence()
    torch.manual_seed(12345)
    torch.rand(10)
    b = make_sampler(100, 64, selection=sel, seed=2).global_sequence()
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# uniform coverage (top-k / stratified)
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(sc=scenarios(modes=("topk", "stratified", None)))
def test_uniform_modes_draw_without_replacement_in_passes(sc):
    sampler = make_sampler(
        sc["pool_size"],
        sc["num_samples"],
        world=sc["world"],
        seed=sc["seed"],
        epoch=sc["epoch"],
        selection=sc["selection"],
    )
    seq = sampler.global_sequence().tolist()
    ok = sorted(allowed(sc))
    k, total = len(ok), len(seq)
    # every selected index appears once before any index repeats: each pass is a permutation of the selection
    for start in range(0, total, k):
        chunk = seq[start : start + k]
        assert len(set(chunk)) == len(chunk)
        if len(chunk) == k:
            assert sorted(chunk) == ok
    if total >= k:
        assert set(seq) == set(ok)  # the whole selection is covered
    counts = Counter(seq)
    assert max(counts.values()) - min(counts.get(i, 0) for i in ok) <= 1


def test_uniform_coverage_across_ranks():
    sel = make_selection(90, 1 / 3, "topk", seed=5)  # 30 selected
    seqs = rank_sequences(90, 10, 3, selection=sel, seed=1, epoch=7)  # 3 ranks x 10 = one full pass
    union = [i for seq in seqs for i in seq]
    assert sorted(union) == sorted(sel.indices.tolist())
    assert all(set(a).isdisjoint(b) for a in seqs for b in seqs if a is not b)


# ----------------------------------------------------------------------------------------------------------------
# weighted
# ----------------------------------------------------------------------------------------------------------------


def test_weighted_frequencies_follow_the_weights():
    rng = np.random.default_rng(0)
    sel = select(np.arange(40), rng.normal(size=40), count=10, mode="weighted", indices=np.arange(40) + 500)
    assert sel.weights.max() / sel.weights.min() > 3  # non-trivial weights
    sampler = make_sampler(540, 20_000, selection=sel, seed=11, world=2, epoch=3)
    seq = sampler.global_sequence()
    counts = Counter(seq.tolist())
    assert set(counts) <= set(sel.indices.tolist())
    observed = np.array([counts.get(int(i), 0) for i in sel.indices])
    expected = sel.weights * len(seq)
    chi2 = stats.chisquare(observed, expected)
    assert chi2.pvalue > 1e-3, chi2
    np.testing.assert_allclose(observed / len(seq), sel.weights, atol=0.01)
    # and clearly not uniform
    assert stats.chisquare(observed).pvalue < 1e-12


def test_weighted_draws_with_replacement_beyond_the_selection_size():
    sel = select(np.arange(20), np.arange(20.0), count=5, mode="weighted", temperature=0.5)
    seq = list(make_sampler(20, 50, selection=sel, seed=0))
    assert len(seq) == 50 and set(seq) <= set(sel.indices.tolist())
    top = int(sel.indices[np.argmax(sel.weights)])
    assert Counter(seq).most_common(1)[0][0] == top


def test_topk_frequencies_are_uniform():
    sel = make_selection(200, 0.1, "topk", seed=6)  # 20 selected
    seq = make_sampler(200, 2_000, selection=sel, seed=4).global_sequence()
    counts = Counter(seq.tolist())
    assert set(counts.values()) == {100}  # exactly uniform: 100 full passes


# ----------------------------------------------------------------------------------------------------------------
# live epoch / selection
# ----------------------------------------------------------------------------------------------------------------


def test_epoch_fn_overrides_set_epoch():
    sel = make_selection(80, 0.5, "topk", seed=7)
    epoch = [3]
    sampler = ScoredSubsetSampler(80, 30, seed=2, selection_fn=lambda: sel, epoch_fn=lambda: epoch[0])
    plain = ScoredSubsetSampler(80, 30, seed=2, selection_fn=lambda: sel)
    plain.set_epoch(3)
    sampler.set_epoch(99)  # ignored: epoch_fn wins
    assert sampler.current_epoch() == 3
    first = list(sampler)
    assert first == list(plain)
    epoch[0] = 4
    plain.set_epoch(4)
    second = list(sampler)
    assert second == list(plain) and second != first
    np.testing.assert_array_equal(sampler.global_sequence(epoch=3), np.array(first))


def test_set_epoch_changes_the_next_iteration():
    sampler = ScoredSubsetSampler(100, 40, seed=0)
    seqs = []
    for e in range(3):
        sampler.set_epoch(e)
        seqs.append(list(sampler))
    assert seqs[0] != seqs[1] != seqs[2]
    sampler.set_epoch(1)
    assert list(sampler) == seqs[1]


def test_selection_is_read_live_at_each_iteration():
    current: list[Selection | None] = [None]
    sampler = ScoredSubsetSampler(100, 25, seed=1, selection_fn=lambda: current[0])
    sampler.set_distributed(1, 2)
    assert set(sampler) <= set(range(100))

    first = select(np.arange(100), np.arange(100.0), count=10, round=0)  # indices 90..99
    current[0] = first
    assert set(sampler) <= set(range(90, 100))

    second = select(np.arange(100), -np.arange(100.0), count=10, round=1, mode="weighted")  # 0..9
    current[0] = second
    it = iter(sampler)  # the selection is fixed when the iteration starts
    current[0] = first
    assert set(it) <= set(range(10))
    assert set(sampler) <= set(range(90, 100))


def test_works_inside_a_dataloader():
    sel = make_selection(64, 0.25, "stratified", seed=8)
    dataset = torch.utils.data.TensorDataset(torch.arange(64))
    sampler = make_sampler(64, 24, selection=sel, world=2, rank=1, seed=3)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=8, drop_last=True)
    assert len(loader) == 3
    drawn = torch.cat([b[0] for b in loader]).tolist()
    assert drawn == list(sampler)
    assert set(drawn) <= set(sel.indices.tolist())


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool_size", "num_samples", "pattern"),
    [(0, 10, "pool"), (-1, 10, "pool"), (10, 0, "num_samples"), (10, -5, "num_samples")],
)
def test_bad_constructor_arguments_raise(pool_size, num_samples, pattern):
    with pytest.raises(ValueError, match=pattern):
        ScoredSubsetSampler(pool_size, num_samples)


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (5, 4), (-1, 2), (0, 0)])
def test_bad_rank_raises(rank, world):
    sampler = ScoredSubsetSampler(10, 5)
    with pytest.raises(ValueError, match="rank"):
        sampler.set_distributed(rank, world)
    assert (sampler.rank, sampler.num_replicas) == (0, 1)  # unchanged


def test_len_is_per_rank_and_total_size_is_global():
    sampler = ScoredSubsetSampler(10, 6)
    sampler.set_distributed(2, 4)
    assert len(sampler) == 6 and len(list(sampler)) == 6
    assert sampler.total_size == 24 and sampler.num_replicas == 4 and sampler.rank == 2
    assert isinstance(sampler, torch.utils.data.DistributedSampler)


def test_empty_selection_raises():
    empty = Selection(ids=np.zeros(0, dtype=np.int64), indices=np.zeros(0, dtype=np.int64), round=2)
    sampler = ScoredSubsetSampler(10, 5, selection_fn=lambda: empty)
    with pytest.raises(RuntimeError, match="round 2"):
        list(sampler)
