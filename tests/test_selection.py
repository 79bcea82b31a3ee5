"""Properties of ``lightning_chips.selection``: budgets, top-k / stratified / weighted selection, validation,
``Selection`` helpers and the atomic round file."""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_chips.selection as selection_mod
from lightning_chips.selection import Selection, budget_for, select, write_round_file

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------
# helpers / strategies
# ----------------------------------------------------------------------------------------------------------------


def reference_budget(n: int, fraction: float) -> int:
    return max(1, round(fraction * n))


def reference_topk(ids, scores, budget: int) -> list[int]:
    """Brute force: positions of the ``budget`` highest scores, ties broken by the smaller id."""
    return sorted(range(len(ids)), key=lambda i: (-float(scores[i]), int(ids[i])))[:budget]


@st.composite
def pools(draw, min_size: int = 1, max_size: int = 60, with_labels: bool = False):
    """Unique (shuffled) ids, scores with many ties, custom indices and optionally labels.

    The arrays come from a drawn numpy seed (cheap to generate and to shrink); the size and the score levels
    are drawn directly. Few distinct score levels on a 0.1 grid -> many ties, so the tie-break by id matters.
    """
    n = draw(st.integers(min_size, max_size))
    levels = draw(st.lists(st.integers(-50, 50), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.choice(2 * 10**6, size=n, replace=False).astype(np.int64) - 10**6
    scores = np.asarray(levels, dtype=np.float64)[rng.integers(0, len(levels), size=n)] / 10
    indices = 100 + rng.permutation(n).astype(np.int64)
    labels = rng.integers(-2, 5, size=n).astype(np.int64) if with_labels else None
    return ids, scores, indices, labels


fractions = st.floats(min_value=1e-4, max_value=1.0, allow_nan=False, exclude_min=False)


def assert_selection_equal(a: Selection, b: Selection) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.indices, b.indices)
    if a.weights is None or b.weights is None:
        assert a.weights is None and b.weights is None
    else:
        np.testing.assert_array_equal(a.weights, b.weights)  # bit-identical, as on every rank
    assert (a.round, a.method, a.num_candidates) == (b.round, b.method, b.num_candidates)


# ----------------------------------------------------------------------------------------------------------------
# budget
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(10, 0.5, 5), (10, 1.0, 10), (1000, 0.1, 100), (10, 0.01, 1), (3, 0.5, 2), (7, 0.3, 2), (1, 0.001, 1)],
)
def test_budget_for_examples(n, fraction, expected):
    assert budget_for(n, fraction) == expected


@SETTINGS
@given(n=st.integers(1, 10**6), fraction=fractions)
def test_budget_for_is_rounded_fraction_at_least_one(n, fraction):
    b = budget_for(n, fraction)
    assert b == reference_budget(n, fraction)
    assert 1 <= b <= n


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_budget_for_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        budget_for(10, fraction)


# ----------------------------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------------------------


def test_docstring_example():
    sel = select(np.array([10, 11, 12, 13]), np.array([0.5, 0.9, 0.5, 0.1]), fraction=0.5)
    assert sel.ids.tolist() == [10, 11]
    assert sel.indices.tolist() == [0, 1]
    assert sel.weights is None
    assert sel.num_candidates == 4


def test_topk_ties_broken_by_smaller_id():
    ids = np.array([9, 3, 7, 1, 5, 2, 8])
    scores = np.array([1.0, 1.0, 2.0, 1.0, 1.0, 0.0, 1.0])
    # 7 has the top score; then the ties at 1.0 in id order: 1, 3, 5, 8, 9
    assert select(ids, scores, count=1).ids.tolist() == [7]
    assert select(ids, scores, count=3).ids.tolist() == [1, 3, 7]
    assert select(ids, scores, count=5).ids.tolist() == [1, 3, 5, 7, 8]
    assert select(ids, scores, count=7).ids.tolist() == [1, 2, 3, 5, 7, 8, 9]


@SETTINGS
@given(pool=pools(), fraction=fractions)
def test_topk_matches_brute_force_reference(pool, fraction):
    ids, scores, indices, _ = pool
    sel = select(ids, scores, fraction=fraction, indices=indices, round=4, method="m")
    budget = reference_budget(len(ids), fraction)
    ref = reference_topk(ids, scores, budget)
    assert len(sel) == budget
    assert sel.ids.tolist() == sorted(int(ids[i]) for i in ref)
    # sorted, int64, and indices aligned with ids
    assert sel.ids.dtype == np.int64 and sel.indices.dtype == np.int64
    assert np.all(np.diff(sel.ids) > 0)
    pos_of = {int(i): p for p, i in enumerate(ids)}
    assert sel.indices.tolist() == [int(indices[pos_of[int(i)]]) for i in sel.ids]
    assert sel.weights is None
    assert (sel.round, sel.method, sel.num_candidates) == (4, "m", len(ids))


@SETTINGS
@given(pool=pools(), data=st.data())
def test_topk_count_matches_brute_force_reference(pool, data):
    ids, scores, _, _ = pool
    count = data.draw(st.integers(1, len(ids)))
    sel = select(ids, scores, count=count)
    assert sel.ids.tolist() == sorted(int(ids[i]) for i in reference_topk(ids, scores, count))
    # default indices are the positions in the input arrays
    np.testing.assert_array_equal(ids[sel.indices], sel.ids)


@SETTINGS
@given(pool=pools(), fraction=fractions)
def test_selected_scores_dominate_unselected(pool, fraction):
    ids, scores, _, _ = pool
    sel = select(ids, scores, fraction=fraction)
    mask = sel.contains(ids)
    if (~mask).any():
        assert scores[mask].min() >= scores[~mask].max()
        # at the boundary score, every selected id is smaller than every unselected one
        edge = scores[mask].min()
        if (scores[~mask] == edge).any():
            assert ids[mask & (scores == edge)].max() < ids[~mask & (scores == edge)].min()


def test_fraction_one_selects_everything():
    rng = np.random.default_rng(0)
    ids = rng.permutation(50) * 3
    sel = select(ids, rng.normal(size=50), fraction=1.0)
    assert sel.ids.tolist() == sorted(ids.tolist())


# ----------------------------------------------------------------------------------------------------------------
# determinism / order invariance
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    pool=pools(with_labels=True),
    fraction=fractions,
    mode=st.sampled_from(["topk", "weighted", "stratified"]),
    temperature=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_selection_is_invariant_to_input_order(pool, fraction, mode, temperature, seed):
    ids, scores, indices, labels = pool
    kwargs = dict(fraction=fraction, mode=mode, temperature=temperature, round=2, method="chips")
    a = select(ids, scores, labels=labels, indices=indices, **kwargs)
    perm = np.random.default_rng(seed).permutation(len(ids))
    b = select(ids[perm], scores[perm], labels=labels[perm], indices=indices[perm], **kwargs)
    c = select(ids.copy(), scores.copy(), labels=labels.copy(), indices=indices.copy(), **kwargs)
    assert_selection_equal(a, b)
    assert_selection_equal(a, c)


def test_select_accepts_lists_and_other_dtypes():
    a = select([3, 1, 2], [0.1, 0.9, 0.5], count=2)
    b = select(np.array([3, 1, 2], dtype=np.int32), np.array([0.1, 0.9, 0.5], dtype=np.float32), count=2)
    assert a.ids.tolist() == b.ids.tolist() == [1, 2]
    assert a.ids.dtype == b.ids.dtype == np.int64


# ----------------------------------------------------------------------------------------------------------------
# stratified
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(pool=pools(with_labels=True), fraction=fractions)
def test_stratified_quotas_and_per_label_top_scores(pool, fraction):
    ids, scores, indices, labels = pool
    sel = select(ids, scores, fraction=fraction, mode="stratified", labels=labels, indices=indices)
    n = len(ids)
    budget = reference_budget(n, fraction)
    assert len(sel) == budget
    assert np.all(np.diff(sel.ids) > 0)
    pos_of = {int(i): p for p, i in enumerate(ids)}
    chosen_pos = [pos_of[int(i)] for i in sel.ids]
    assert sel.indices.tolist() == [int(indices[p]) for p in chosen_pos]
    picked = Counter(int(labels[p]) for p in chosen_pos)
    freq = Counter(labels.tolist())
    assert sum(picked.values()) == budget
    for label, count in freq.items():
        exact = count * budget / n
        q = picked.get(label, 0)
        assert math.floor(exact) <= q <= math.ceil(exact), (label, q, exact)
        # the label's picks are its top-q scores (ties by id)
        members = np.flatnonzero(labels == label)
        ref = reference_topk(ids[members], scores[members], q)
        assert sorted(int(ids[members][i]) for i in ref) == sorted(
            int(ids[p]) for p in chosen_pos if labels[p] == label
        )


def test_stratified_largest_remainder_example():
    # labels 0 x5, 1 x3, 2 x2; budget 3 -> exact (1.5, 0.9, 0.6) -> one of each
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    ids = np.arange(10)
    scores = np.arange(10, dtype=float)[::-1]  # label 0 has all the best scores
    sel = select(ids, scores, count=3, mode="stratified", labels=labels)
    assert sel.ids.tolist() == [0, 5, 8]
    # top-k would have taken label 0 only
    assert select(ids, scores, count=3).ids.tolist() == [0, 1, 2]


def test_stratified_single_label_equals_topk():
    rng = np.random.default_rng(1)
    ids = rng.permutation(40)
    scores = rng.integers(0, 4, size=40).astype(float)
    a = select(ids, scores, fraction=0.3, mode="stratified", labels=np.full(40, 7))
    b = select(ids, scores, fraction=0.3)
    np.testing.assert_array_equal(a.ids, b.ids)


def test_stratified_without_labels_raises():
    with pytest.raises(ValueError, match="labels"):
        select(np.arange(5), np.arange(5.0), fraction=0.5, mode="stratified")


# ----------------------------------------------------------------------------------------------------------------
# weighted
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(pool=pools(), fraction=fractions, temperature=st.floats(0.25, 4.0))
def test_weighted_same_set_as_topk_with_monotone_probabilities(pool, fraction, temperature):
    ids, scores, indices, _ = pool
    w = select(ids, scores, fraction=fraction, mode="weighted", indices=indices, temperature=temperature)
    t = select(ids, scores, fraction=fraction, indices=indices)
    np.testing.assert_array_equal(w.ids, t.ids)
    np.testing.assert_array_equal(w.indices, t.indices)
    assert w.weights is not None
    assert w.weights.shape == w.ids.shape
    assert np.all(w.weights > 0)
    assert math.isclose(float(w.weights.sum()), 1.0, rel_tol=0, abs_tol=1e-9)
    # monotone in score: a higher score never gets a lower weight, equal scores get equal weights
    pos_of = {int(i): p for p, i in enumerate(ids)}
    s = np.array([scores[pos_of[int(i)]] for i in w.ids])
    higher = s[:, None] > s[None, :]
    same = s[:, None] == s[None, :]
    wi, wj = np.meshgrid(w.weights, w.weights, indexing="ij")
    assert np.all(wi[higher] > wj[higher])
    np.testing.assert_allclose(wi[same], wj[same], rtol=1e-12)


def test_weighted_lower_temperature_concentrates():
    rng = np.random.default_rng(2)
    ids = np.arange(200)
    scores = rng.normal(size=200)

    def entropy(p):
        return float(-(p * np.log(p)).sum())

    ws = [select(ids, scores, fraction=0.25, mode="weighted", temperature=t).weights for t in (4.0, 1.0, 0.5, 0.2)]
    maxes = [w.max() for w in ws]
    ents = [entropy(w) for w in ws]
    assert maxes == sorted(maxes) and len(set(maxes)) == 4
    assert ents == sorted(ents, reverse=True) and len(set(ents)) == 4
    # a very high temperature approaches uniform
    hot = select(ids, scores, fraction=0.25, mode="weighted", temperature=1e6).weights
    np.testing.assert_allclose(hot, 1 / len(hot), rtol=1e-4)


def test_weighted_equal_scores_are_uniform():
    sel = select(np.arange(10), np.ones(10), count=4, mode="weighted", temperature=0.3)
    np.testing.assert_allclose(sel.weights, 0.25)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_weighted_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        select(np.arange(5), np.arange(5.0), fraction=0.5, mode="weighted", temperature=temperature)


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["topk", "weighted", "stratified"])
def test_non_finite_scores_name_ids_and_round(bad, mode):
    ids = np.array([100, 7, 42, 5, 99])
    scores = np.array([0.1, bad, 0.3, 0.4, bad])
    with pytest.raises(ValueError) as info:
        select(ids, scores, fraction=0.5, mode=mode, labels=np.zeros(5, dtype=int), round=3)
    msg = str(info.value)
    assert "round 3" in msg
    assert "7" in msg and "99" in msg
    assert "100" not in msg and "42" not in msg  # only the offending ids
    assert "NaN" in msg or "inf" in msg


def test_non_finite_scores_list_at_most_a_few_ids():
    ids = np.arange(1000, 1100)
    scores = np.full(100, np.nan)
    with pytest.raises(ValueError, match=r"100 scores .*1000, 1001, 1002, 1003, 1004\]") as info:
        select(ids, scores, count=1, round=1)
    assert "1050" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(fraction=0.0), "fraction"),
        (dict(fraction=1.5), "fraction"),
        (dict(fraction=-0.5), "fraction"),
        (dict(count=0), "count"),
        (dict(count=11), "count"),
        (dict(count=-3), "count"),
        (dict(), "exactly one"),
        (dict(fraction=0.5, count=3), "exactly one"),
        (dict(fraction=0.5, mode="random"), "mode"),
        (dict(fraction=0.5, mode="TOPK"), "mode"),
    ],
)
def test_bad_budget_or_mode_raises_helpful_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        select(np.arange(10), np.linspace(0, 1, 10), **kwargs)


def test_count_error_names_the_number_of_candidates():
    with pytest.raises(ValueError, match=r"\[1, 10\].*got 11"):
        select(np.arange(10), np.zeros(10), count=11)


@pytest.mark.parametrize("scores", [np.zeros(9), np.zeros(11), np.zeros((10, 1)), np.zeros((2, 5))])
def test_scores_shape_mismatch_raises(scores):
    with pytest.raises(ValueError, match="shape"):
        select(np.arange(10), scores, fraction=0.5)


def test_empty_pool_raises():
    with pytest.raises(ValueError, match="[Nn]othing to select"):
        select(np.array([], dtype=np.int64), np.array([]), fraction=0.5)


@pytest.mark.parametrize("length", [5, 20])
def test_indices_shape_mismatch_raises(length):
    with pytest.raises(ValueError, match="indices"):
        select(np.arange(10), np.linspace(0, 1, 10), fraction=0.5, indices=np.arange(length))


@pytest.mark.parametrize("length", [5, 20])
def test_labels_shape_mismatch_raises(length):
    with pytest.raises(ValueError, match="labels"):
        select(np.arange(10), np.linspace(0, 1, 10), fraction=0.5, mode="stratified", labels=np.zeros(length))


# ----------------------------------------------------------------------------------------------------------------
# Selection helpers
# ----------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    selected=st.sets(st.integers(-50, 50), max_size=30),
    queries=st.lists(st.integers(-60, 60), max_size=40),
    other=st.sets(st.integers(-50, 50), max_size=30),
)
def test_contains_and_overlap_match_python_sets(selected, queries, other):
    a_ids = np.array(sorted(selected), dtype=np.int64)
    b_ids = np.array(sorted(other), dtype=np.int64)
    a = Selection(ids=a_ids, indices=a_ids + 1000)
    b = Selection(ids=b_ids, indices=b_ids + 1000)
    mask = a.contains(np.array(queries, dtype=np.int64))
    assert mask.dtype == bool
    assert mask.tolist() == [q in selected for q in queries]
    if selected:
        assert a.overlap(b) == pytest.approx(len(selected & other) / len(selected))
    else:
        assert math.isnan(a.overlap(b))
    assert math.isnan(a.overlap(None))


def test_contains_edge_values():
    sel = Selection(ids=np.array([2, 4, 6]), indices=np.array([0, 1, 2]))
    assert sel.contains([1, 2, 3, 4, 5, 6, 7, -(2**62), 2**62]).tolist() == [
        False, True, False, True, False, True, False, False, False,
    ]  # fmt: skip
    assert sel.contains(np.zeros((0,), dtype=np.int64)).shape == (0,)
    # 2-D queries keep their shape
    assert sel.contains(np.array([[2, 3], [6, 7]])).tolist() == [[True, False], [True, False]]


def test_overlap_of_real_rounds():
    rng = np.random.default_rng(3)
    ids = rng.permutation(100)
    s1 = rng.normal(size=100)
    a = select(ids, s1, fraction=0.2)
    assert a.overlap(a) == 1.0
    b = select(ids, -s1, fraction=0.2)
    assert b.overlap(a) == 0.0
    c = select(ids, s1 + 0.3 * rng.normal(size=100), fraction=0.2)
    assert c.overlap(a) == pytest.approx(len(set(c.ids) & set(a.ids)) / 20)


@pytest.mark.parametrize("mode", ["topk", "weighted"])
def test_state_dict_round_trip(mode):
    rng = np.random.default_rng(4)
    sel = select(
        rng.permutation(30),
        rng.normal(size=30),
        fraction=0.3,
        mode=mode,
        round=5,
        method="chips",
        indices=np.arange(30) * 2,
    )
    state = sel.state_dict()
    restored = Selection.from_state_dict(state)
    assert_selection_equal(sel, restored)
    assert restored.ids.dtype == np.int64 and restored.indices.dtype == np.int64
    # the state is a copy: mutating it does not change the selection
    state["ids"][:] = -1
    assert (sel.ids >= 0).all()
    # it also survives a plain-python round trip (e.g. a checkpoint serialised as lists)
    plain = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in sel.state_dict().items()}
    assert_selection_equal(sel, Selection.from_state_dict(plain))


# ----------------------------------------------------------------------------------------------------------------
# write_round_file
# ----------------------------------------------------------------------------------------------------------------


def _round_arrays(seed: int = 0, n: int = 40):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n) * 5 + 11
    scores = rng.normal(size=n)
    sel = select(ids, scores, fraction=0.25)
    return ids, scores, sel.contains(ids)


def test_write_round_file_round_trip(tmp_path):
    ids, scores, selected = _round_arrays()
    path = tmp_path / "rounds" / "nested" / "round_003.npz"
    out = write_round_file(path, ids, scores, selected, round=3, method="chips", fraction=0.25)
    assert out == path and path.is_file()
    with np.load(path) as f:
        assert set(f.files) == {"ids", "scores", "selected", "round", "method", "fraction"}
        order = np.argsort(ids)
        assert f["ids"].dtype == np.int64 and f["ids"].tolist() == sorted(ids.tolist())
        assert f["scores"].dtype == np.float32
        np.testing.assert_array_equal(f["scores"], scores[order].astype(np.float32))
        assert f["selected"].dtype == bool
        np.testing.assert_array_equal(f["selected"], selected[order])
        assert int(f["round"]) == 3 and str(f["method"]) == "chips" and float(f["fraction"]) == 0.25
    assert sorted(os.listdir(path.parent)) == ["round_003.npz"]  # no temp file left behind


def test_write_round_file_overwrites_atomically(tmp_path):
    path = tmp_path / "r.npz"
    write_round_file(path, *_round_arrays(0), round=0)
    write_round_file(path, *_round_arrays(1, n=10), round=1)
    with np.load(path) as f:
        assert int(f["round"]) == 1 and len(f["ids"]) == 10
    assert os.listdir(tmp_path) == ["r.npz"]


def _assert_previous_file_intact(path, ids) -> None:
    with np.load(path) as f:
        assert int(f["round"]) == 0
        assert f["ids"].tolist() == sorted(ids.tolist())
    assert os.listdir(path.parent) == [path.name], "a temporary file was left behind"


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_inside_savez_keeps_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "round.npz"
    ids, scores, selected = _round_arrays()
    write_round_file(path, ids, scores, selected, round=0)

    real_savez = np.savez

    def partial_savez(file, *args, **kwds):
        file.write(b"PK\x03\x04 half a zip")  # part of the file, then the crash
        file.flush()
        raise exc

    monkeypatch.setattr(np, "savez", partial_savez)
    with pytest.raises(type(exc)):
        write_round_file(path, *_round_arrays(7), round=1)
    monkeypatch.setattr(np, "savez", real_savez)
    _assert_previous_file_intact(path, ids)


def test_crash_in_replace_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "round.npz"
    ids, scores, selected = _round_arrays()
    write_round_file(path, ids, scores, selected, round=0)

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(selection_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_round_file(path, *_round_arrays(7), round=1)
    monkeypatch.undo()
    _assert_previous_file_intact(path, ids)


def test_crash_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "round.npz"

    def failing_savez(file, *args, **kwds):
        file.write(b"garbage")
        raise RuntimeError("boom")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(RuntimeError):
        write_round_file(path, *_round_arrays())
    assert os.listdir(tmp_path) == []
