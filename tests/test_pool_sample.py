"""The pool sample of a shard pool (``ShardPool.pool_sample_batches``, ``WebDatasetPairs.sample_plan``): it
represents a pool written in source order, agrees with a map-style pool's uniform draw, reads a bounded number of
shards, each on one rank, and is drawn anew each round (docs/offline.md, "The pool sample")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lightning_chips.data import PairCollate, WebDatasetPairs
from lightning_chips.data import webdataset as webdataset_module
from lightning_chips.data.pool import SHARD_STRIDE, MapPool, ShardPool
from lightning_chips.data.target import ListDataset
from lightning_chips.data.webdataset import SAMPLE_MIN_SHARDS, SAMPLE_PER_SHARD

from .shards import write_pool

SEEDS_ROUNDS = [(0, 0), (0, 1), (1, 0), (3, 2), (7, 5), (11, 1)]


def _collate() -> PairCollate:
    import open_clip

    return PairCollate(open_clip.tokenizer.SimpleTokenizer(context_length=16))


def _source_ordered(root: Path, shards: int, per_shard: int) -> Path:
    """``shards`` shards written in source order: the first half holds general-domain pairs (``"domain": 0``),
    the second half target-domain pairs (``"domain": 1``)."""
    half = shards // 2 * per_shard
    write_pool(root, num_pairs=half, per_shard=per_shard, target_fraction=0.0, prefix="a", json_fields=("domain",))
    write_pool(root, num_pairs=half, per_shard=per_shard, target_fraction=1.0, prefix="b", uid_offset=2 * 10**12,
               json_fields=("domain",))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> Path:
    """10 shards of 20 pairs: shards 0-4 general, 5-9 target."""
    return _source_ordered(tmp_path_factory.mktemp("ten"), shards=10, per_shard=20)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """48 shards of 6 pairs: shards 0-23 general, 24-47 target."""
    return _source_ordered(tmp_path_factory.mktemp("many"), shards=48, per_shard=6)


def _pool(root: Path, **kwargs) -> ShardPool:
    return ShardPool(WebDatasetPairs(str(root), image_size=16), None, _collate(), batch_size=8, **kwargs)


def _rows(items) -> list[tuple[int, int, int]]:
    """``(order, id, domain)`` of every pair of a pool's stream, in stream order."""
    rows = []
    for batch, skipped in items:
        assert skipped == []
        key = "order" if "order" in batch else "index"
        for order, uid, meta in zip(batch[key].tolist(), batch["id"].tolist(), batch["json"], strict=True):
            rows.append((order, uid, meta.get("domain")))
    return rows


def _share(rows) -> float:
    return float(np.mean([domain for _, _, domain in rows]))


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The shards opened (``webdataset._open``, the one opener of shard bytes) from now on."""
    urls: list[str] = []
    real = webdataset_module._open

    def counting(url: str):
        urls.append(url)
        return real(url)

    monkeypatch.setattr(webdataset_module, "_open", counting)
    return urls


def test_a_pool_written_in_source_order_gives_a_sample_with_the_pools_domain_shares(ten, many):
    """The old sample (the first ``size`` pairs of the shards in a seeded order) of 50 pairs from 10 shards of 20
    was 2.5 shards, so one or two domains' worth of whole shards; now every shard gives 5 pairs (a pool of fewer
    than SAMPLE_MIN_SHARDS shards is sampled in all of them)."""
    pool = _pool(ten)
    old_deviation = []
    for seed, round_ in SEEDS_ROUNDS:
        rows = _rows(pool.pool_sample_batches(50, round_, seed, 0, 1))
        assert len(rows) == 50 and abs(_share(rows) - 0.5) <= 0.15
        first = np.random.default_rng([seed, round_]).permutation(10)[:3] >= 5  # the old order's first 3 shards
        old_deviation.append(abs((20 * first[0] + 20 * first[1] + 10 * first[2]) / 50 - 0.5))
    assert max(old_deviation) > 0.15  # the same check fails the old sample (a share of 0.8 for seed 7, round 5)
    # 48 shards of 6 pairs, at most 3 pairs a shard: 120 pairs from 40 of the shards
    sparse = _pool(many, sample_per_shard=3)
    for seed, round_ in SEEDS_ROUNDS:
        rows = _rows(sparse.pool_sample_batches(120, round_, seed, 0, 1))
        assert len(rows) == 120 and len({s // SHARD_STRIDE for s, _, _ in rows}) == 40
        assert abs(_share(rows) - 0.5) <= 0.15


def test_map_style_and_shard_samples_of_the_same_pairs_agree(many):
    """The domain share of a map-style pool's uniform draw and of the shard sample of the same pairs, over ten
    seeds and rounds: each sample within 0.15 of the pool's, their means within 0.06 of each other."""
    pairs = list(WebDatasetPairs(str(many), image_size=16))  # the decoded pairs, in pool order
    maps = MapPool(ListDataset(pairs), None, _collate(), batch_size=8)
    shards = _pool(many, sample_per_shard=3)
    map_shares, shard_shares = [], []
    for seed, round_ in [*SEEDS_ROUNDS, (2, 2), (4, 0), (5, 3), (9, 9)]:
        map_shares.append(_share(_rows(maps.pool_sample_batches(120, round_, seed, 0, 1))))
        shard_shares.append(_share(_rows(shards.pool_sample_batches(120, round_, seed, 0, 1))))
    pool_share = float(np.mean([p["json"]["domain"] for p in pairs]))
    assert pool_share == 0.5
    for shares in (map_shares, shard_shares):
        assert max(abs(s - pool_share) for s in shares) <= 0.15
    assert abs(np.mean(map_shares) - np.mean(shard_shares)) <= 0.06


@pytest.mark.parametrize(("root", "size", "per_shard"), [("ten", 50, None), ("ten", 8192, None), ("many", 160, None),
                                                         ("many", 120, 3), ("many", 2000, 20)])  # fmt: skip
def test_a_pool_sample_opens_the_shards_the_docs_state_and_decodes_its_pairs(request, opened, monkeypatch, root,
                                                                             size, per_shard):  # fmt: skip
    """Shards opened, each once: ``k = min(#shards, max(SAMPLE_MIN_SHARDS, ceil(size / per_shard)))`` when each
    drawn shard holds its slot's pairs (``ten``: 20 a shard, 5 or 820 wanted; ``many`` with 3 a shard), more when
    they are smaller (``many``: 6 a shard, 10 wanted from each of 16 slots, so 2 shards a slot); images decoded:
    ``size`` when no drawn sample is bad (every pair of a pool smaller than the sample)."""
    decoded = []
    real = webdataset_module.decode_pair
    monkeypatch.setattr(webdataset_module, "decode_pair", lambda raw, *a, **k: decoded.append(1) or real(raw, *a, **k))
    pool = _pool(request.getfixturevalue(root), **({} if per_shard is None else {"sample_per_shard": per_shard}))
    n, each = len(pool.pairs.urls), (20 if root == "ten" else 6)
    rows = _rows(pool.pool_sample_batches(size, 0, 0, 0, 1))
    plan = pool.pairs.sample_plan(size, [0, 0], per_shard or SAMPLE_PER_SHARD)
    k = min(n, max(SAMPLE_MIN_SHARDS, math.ceil(size / (per_shard or SAMPLE_PER_SHARD))))
    assert len(plan) == k
    expected = sum(min(len(chain), math.ceil(quota / each)) for quota, chain in plan)
    assert expected == {("ten", 50): k, ("ten", 8192): 10, ("many", 160): 32, ("many", 120): 40, ("many", 2000): 48}[
        (root, size)]  # fmt: skip
    assert len(opened) == len(set(opened)) == expected
    assert len(rows) == len(decoded) == min(size, n * each)


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_parts_make_the_one_rank_sample_and_each_rank_reads_its_share(many, opened, world):
    """16 slots of 10 pairs from 6-pair shards: every slot reads the first 2 shards of its chain."""
    pool = _pool(many)
    whole = _rows(pool.pool_sample_batches(160, 2, 5, 0, 1))
    slots = [[pool.pairs.urls[i] for i in chain[:2]] for _, chain in pool.pairs.sample_plan(160, [5, 2])]
    assert sorted(opened) == sorted(u for slot in slots for u in slot) and len(opened) == 32
    parts = []
    for rank in range(world):
        opened.clear()
        parts.append(_rows(pool.pool_sample_batches(160, 2, 5, rank, world)))
        assert opened == [u for slot in slots[rank::world] for u in slot]  # its share of the slots, nothing else
    assert sorted(r for part in parts for r in part) == sorted(whole)  # same pairs, same order keys
    assert len({uid for _, uid, _ in whole}) == 160


def test_the_sample_is_the_same_for_the_same_seed_and_round_and_differs_across_rounds(many):
    pool = _pool(many)
    first = _rows(pool.pool_sample_batches(40, 3, 1, 0, 1))
    assert _rows(_pool(many).pool_sample_batches(40, 3, 1, 0, 1)) == first
    for other in (pool.pool_sample_batches(40, 4, 1, 0, 1), pool.pool_sample_batches(40, 3, 2, 0, 1)):
        assert {uid for _, uid, _ in _rows(other)} != {uid for _, uid, _ in first}


def test_bad_samples_and_a_truncated_shard_are_left_out_of_the_sample(tmp_path):
    """A drawn bad sample is replaced by a spare one of its shard; a truncated shard gives what it holds (its slot
    has no other shard here: 3 shards, 3 slots); nothing is raised or reported (the scoring pass reports them)."""
    write_pool(tmp_path, num_pairs=60, per_shard=20, corrupt_image=3, missing_caption=4)
    tars = sorted(tmp_path.glob("*.tar"))
    tars[2].write_bytes(tars[2].read_bytes()[:12000])  # cut inside the third shard
    pool = _pool(tmp_path)
    for seed in range(4):
        wanted = {chain[0]: quota for quota, chain in pool.pairs.sample_plan(20, [seed, 0])}
        assert sorted(wanted.values()) == [6, 7, 7]
        shards = [order // SHARD_STRIDE for order, _, _ in _rows(pool.pool_sample_batches(20, 0, seed, 0, 1))]
        assert shards.count(0) == wanted[0] and shards.count(1) == wanted[1]  # shard 0's 2 bad samples replaced
        assert 0 < shards.count(2) < wanted[2]
    every = _rows(pool.pool_sample_batches(None, 0, 0, 0, 1))
    assert 38 < len(every) < 42  # 20 - 2 bad, 20, and the first samples of the third shard


def test_a_slot_whose_shard_falls_short_goes_on_to_the_next_shard_of_its_chain(tmp_path, opened):
    """20 shards of 3 pairs dealt into 16 slots: 4 chains of 2 shards, 12 of 1, and the pairs split 2:1 between
    them. 40 pairs: the long chains want 4 and read both shards; the pool's size (60): every pair."""
    write_pool(tmp_path, num_pairs=60, per_shard=3)
    pool = _pool(tmp_path)
    plan = pool.pairs.sample_plan(40, [0, 0])
    assert sorted((len(chain), quota) for quota, chain in plan) == [(1, 2)] * 12 + [(2, 4)] * 4
    assert len(_rows(pool.pool_sample_batches(40, 0, 0, 0, 1))) == 40 and len(opened) == 20
    assert len(_rows(pool.pool_sample_batches(60, 0, 0, 0, 1))) == 60


def test_the_sample_options_are_validated(many):
    with pytest.raises(ValueError, match="sample_per_shard"):
        _pool(many, sample_per_shard=0)
    with pytest.raises(ValueError, match="size"):
        _pool(many).pairs.sample_plan(-1, 0)
    with pytest.raises(ValueError, match="rank"):
        list(_pool(many).pairs.sample_pairs(4, 0, rank=2, world=2))
    assert list(_pool(many).pool_sample_batches(0, 0, 0, 0, 1)) == []


def test_the_default_8192_pair_sample_of_a_large_pool_is_spread_over_32_shards(tmp_path):
    """The plan alone (no shard is read): 8,192 pairs over 1,000 shards are 32 slots; 8 are dealt 32 shards and
    24 are dealt 31, and they want 262 and 254 pairs (docs/offline.md, "The pool sample")."""
    for i in range(1000):
        (tmp_path / f"{i:06d}.tar").touch()
    plan = WebDatasetPairs(str(tmp_path), image_size=16).sample_plan(8192, [0, 0])
    assert sorted((len(chain), quota) for quota, chain in plan) == [(31, 254)] * 24 + [(32, 262)] * 8
    assert sorted(shard for _, chain in plan for shard in chain) == list(range(1000))  # the chains deal every shard
