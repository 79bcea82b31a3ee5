"""WebDataset pools: every valid pair read once, bad samples and truncated shards reported, ranks and workers
partition the shards, the selection filter keeps exactly the selected uids."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from lightning_chips.data import resolve_tokenizer
from lightning_chips.data.webdataset import (
    ImageCaptionFolder,
    ShardCollate,
    ShardReport,
    WebDatasetPairs,
    decode_pair,
    expand_shards,
    image_transform,
)

from .shards import png_bytes, write_pool


def _pairs(items) -> list[dict]:
    return [item for item in items if not isinstance(item, ShardReport)]


def _reports(items) -> list[ShardReport]:
    return [item for item in items if isinstance(item, ShardReport)]


def test_reads_every_valid_pair_once_and_reports_the_bad_ones(tmp_path):
    valid = write_pool(tmp_path, num_pairs=40, per_shard=8, corrupt_image=3, missing_caption=17)
    pool = WebDatasetPairs(str(tmp_path), image_size=32, reports=True)
    items = list(pool)
    pairs, reports = _pairs(items), _reports(items)
    assert sorted(p["id"] for p in pairs) == sorted(valid)
    assert all(p["text"] == valid[p["id"]]["text"] for p in pairs)
    assert all(p["image"].shape == (3, 32, 32) and 0 <= p["image"].min() <= p["image"].max() <= 1 for p in pairs)
    assert [r.url for r in reports] == pool.urls and len(pool.urls) == 5
    bad = {key: reason for r in reports for key, reason in r.bad}
    assert set(bad) == {"s000003", "s000017"}
    assert bad["s000003"].startswith("undecodable image") and "0x" not in bad["s000003"]
    assert bad["s000017"] == "missing caption"
    assert sum(r.samples for r in reports) == len(valid) == 38
    # the decoded image is the written one
    first = next(p for p in pairs if p["id"] == 10**12)
    expected = image_transform(32)(Image.open(io.BytesIO(valid[10**12]["png"])).convert("RGB"))
    torch.testing.assert_close(first["image"], expected)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"txt": b"a cat"}, "missing uid (no json member)"),
        ({"txt": b"a cat", "json": b"{not json"}, "missing uid (json does not parse)"),
        ({"txt": b"a cat", "json": b'{"id": 3}'}, "missing uid (no 'uid' in json)"),
        ({"txt": b"a cat", "json": b'{"uid": 1.5}'}, "missing uid (uid=1.5 is not an int64 or a string)"),
        ({"txt": b"a cat", "json": b'{"uid": 18446744073709551615}'}, "is not an int64"),
        ({"json": b'{"uid": 1}'}, "missing caption"),
        ({"txt": b"   \n", "json": b'{"uid": 1}'}, "empty caption"),
        ({"txt": b"\xff\xfe", "json": b'{"uid": 1}'}, "caption is not UTF-8"),
        ({"txt": b"a cat", "json": b'{"uid": 1}'}, "missing image"),
        ({"txt": b"a cat", "json": b'{"uid": 1}', "jpg": b""}, "empty image file"),
    ],
)
def test_decode_pair_names_what_is_wrong(raw, reason):
    result = decode_pair(raw, image_transform(8))
    assert isinstance(result, str) and reason in result


def test_decode_pair_accepts_string_uids_and_strips_captions():
    image = png_bytes(torch.rand(3, 8, 8))
    pair = decode_pair({"png": image, "txt": b"  a cat \n", "json": b'{"uid": "42"}'}, image_transform(8))
    assert pair["id"] == 42 and pair["text"] == "a cat"


def test_a_truncated_shard_is_reported_and_the_rest_is_read(tmp_path):
    valid = write_pool(tmp_path, num_pairs=24, per_shard=8)
    shard = tmp_path / "pool-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    items = list(WebDatasetPairs(str(tmp_path), image_size=32, reports=True))
    reports = {r.url: r for r in _reports(items)}
    broken = reports[str(shard)]
    assert broken.error is not None and "truncated" in broken.error
    assert 0 < broken.samples < 8
    ids = [p["id"] for p in _pairs(items)]
    assert len(ids) == len(set(ids)) == 16 + broken.samples
    assert set(ids) <= set(valid)
    assert all(r.error is None for url, r in reports.items() if url != str(shard))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_ranks_and_workers_partition_the_shards(tmp_path, start_method):
    valid = write_pool(tmp_path, num_pairs=48, per_shard=6)  # 8 shards
    collate = ShardCollate(resolve_tokenizer(None, 16))  # picklable, as spawned workers need
    seen = []
    for rank in range(2):
        pool = WebDatasetPairs(str(tmp_path), image_size=32, reports=True).bind(rank, 2)
        loader = DataLoader(pool, batch_size=5, num_workers=2, collate_fn=collate, multiprocessing_context=start_method)
        ids = [i for batch in loader for i in batch["id"].tolist()]
        assert len(ids) == 24  # 4 shards of 6 per rank
        seen.append(set(ids))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(valid)


def test_bind_validates_and_ranks_get_strided_shards(tmp_path):
    write_pool(tmp_path, num_pairs=30, per_shard=6)
    pool = WebDatasetPairs(str(tmp_path))
    assert pool.bind(1, 2).shards_of_rank() == pool.urls[1::2]
    with pytest.raises(ValueError, match="rank"):
        pool.bind(2, 2)


def test_selection_filter_keeps_exactly_the_selected_uids(tmp_path):
    valid = write_pool(tmp_path, num_pairs=32, per_shard=8)
    chosen = np.array(sorted(valid)[::3])
    pool = WebDatasetPairs(str(tmp_path), image_size=32, reports=True).with_selection(chosen)
    items = list(pool)
    assert sorted(p["id"] for p in _pairs(items)) == chosen.tolist()
    assert sum(r.filtered for r in _reports(items)) == 32 - len(chosen)


def test_expand_shards_specs(tmp_path):
    write_pool(tmp_path, num_pairs=24, per_shard=8)
    names = [str(tmp_path / f"pool-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path)) == names
    assert expand_shards(str(tmp_path / "pool-{000000..000002}.tar")) == names
    assert expand_shards(f"{names[2]}::{names[0]}") == [names[2], names[0]]
    assert expand_shards(str(tmp_path / "pool-*.tar")) == names
    with pytest.raises(ValueError, match="does not exist"):
        expand_shards(str(tmp_path / "pool-{000000..000005}.tar"))
    with pytest.raises(ValueError, match="twice"):
        expand_shards([names[0], names[0]])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .tar"):
        expand_shards(str(empty))


def test_image_caption_folder(tmp_path):
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(torch.rand(3, 16, 16)))
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}")
    (tmp_path / "img1.json").write_text(json.dumps({"uid": 77}))
    (tmp_path / "orphan.txt").write_text("no image")
    folder = ImageCaptionFolder(tmp_path, image_size=8)
    assert [p["text"] for p in folder] == ["caption 0", "caption 1", "caption 2"]
    assert [p["id"] for p in folder] == [0, 77, 2]
    assert folder.bad == [("orphan", "missing image (no jpg/jpeg/png/webp member)")]


def test_shardwriter_layout_roundtrip(tmp_path):
    """A shard written by webdataset's own writer with dotted keys keeps the key up to the first dot."""
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        sink.write({"__key__": "dir/a", "png": png_bytes(torch.rand(3, 8, 8)), "txt": b"cap",
                    "json": b'{"uid": 5}'})  # fmt: skip
    (pair,) = _pairs(WebDatasetPairs(str(tmp_path / "x.tar"), image_size=8))
    assert pair["id"] == 5 and pair["text"] == "cap"
