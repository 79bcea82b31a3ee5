"""Damaged shards in the offline pass, and what every later command says about them (docs/offline.md, "Resume" and
"Damage"): a shard repaired or changed since it was scored is scored again; `score`, `select` and `report` name the
shards not read to the end and the skipped samples; `select --reshard` reads the uids from the field the scores
were made with and publishes a set others can read."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import webdataset as wds

from lightning_chips import OpenCLIPModule
from lightning_chips.data.webdataset import WebDatasetPairs
from lightning_chips.offline import MANIFEST, read_scores, score_pool
from lightning_chips.report import build_report
from lightning_chips.reshard import RESHARD_MANIFEST, select_subset
from lightning_chips.scoring import CLIPScore

from .conftest import TINY_VIT
from .shards import write_pool

PER_SHARD = 8


def _score(pool: Path, out: Path, **kwargs) -> Path:
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    return score_pool(module, CLIPScore(), str(pool), str(out), batch_size=8, num_workers=0, trainer=trainer, **kwargs)


def _truncate(shard: Path) -> bytes:
    """Cut ``shard`` in half (in the middle of a sample); returns its intact bytes."""
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    return intact


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A pool of 3 shards whose second one is truncated, scored: ``(pool, output, valid uids, the shard)``."""
    root = tmp_path_factory.mktemp("damaged")
    valid = write_pool(root / "pool", num_pairs=3 * PER_SHARD, per_shard=PER_SHARD)
    shard = root / "pool" / "pool-000001.tar"
    _truncate(shard)
    _score(root / "pool", root / "out")
    return root / "pool", root / "out", valid, shard


# --------------------------------------------------------------------------------------------------------------
# resume: a part records what it scored
# --------------------------------------------------------------------------------------------------------------
def test_a_repaired_shard_is_scored_again_and_every_pair_is_scored(tmp_path, caplog):
    valid = write_pool(tmp_path / "pool", num_pairs=3 * PER_SHARD, per_shard=PER_SHARD)
    shard = tmp_path / "pool" / "pool-000001.tar"
    intact = _truncate(shard)
    out = tmp_path / "out"
    _score(tmp_path / "pool", out)
    damaged = read_scores(out)["ids"].tolist()
    assert len(damaged) < len(valid)  # the pairs after the damage point are missing
    part = next(p for p in (out / "parts").glob("pool-000001*.npz"))
    with np.load(part) as f:
        source = json.loads(str(f["source"]))
    assert source["read_to_end"] is False and source["size"] == len(intact) // 2

    shard.write_bytes(intact)  # repaired
    caplog.set_level(logging.INFO)
    _score(tmp_path / "pool", out)
    assert f"scoring 1 shard again (the part is replaced): {shard}: it was not read to the end" in caplog.text
    repaired = read_scores(out)
    assert repaired["ids"].tolist() == sorted(valid)  # every pair scored
    fresh = read_scores(_score(tmp_path / "pool", tmp_path / "fresh"))
    np.testing.assert_allclose(repaired["scores"], fresh["scores"], rtol=1e-5, atol=1e-6)  # (other batches)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["unreadable_shards"] == [] and manifest["skipped"] == 0

    caplog.clear()
    _score(tmp_path / "pool", out)  # now every part stands for its shard: nothing is scored again
    assert "again" not in caplog.text and "3/3 shards already scored" in caplog.text


def test_a_shard_that_changed_since_it_was_scored_is_scored_again(tmp_path, caplog):
    write_pool(tmp_path / "pool", num_pairs=2 * PER_SHARD, per_shard=PER_SHARD)
    out = tmp_path / "out"
    _score(tmp_path / "pool", out)
    # the second shard is replaced by other pairs (other uids): its size and modification time change
    replacement = write_pool(tmp_path / "other", num_pairs=PER_SHARD, per_shard=PER_SHARD, uid_offset=7 * 10**12)
    shard = tmp_path / "pool" / "pool-000001.tar"
    shutil.copyfile(tmp_path / "other" / "pool-000000.tar", shard)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # whatever the clock's grain
    caplog.set_level(logging.INFO)
    _score(tmp_path / "pool", out)
    assert f"{shard}: it changed since it was scored" in caplog.text
    ids = read_scores(out)["ids"].tolist()
    assert set(replacement) <= set(ids) and len(ids) == 2 * PER_SHARD  # the old pairs of that shard are gone


# --------------------------------------------------------------------------------------------------------------
# damage is named downstream: score, select, report
# --------------------------------------------------------------------------------------------------------------
def test_score_names_the_damaged_shard_and_says_the_pairs_after_the_damage_were_not_scored(tmp_path, caplog):
    write_pool(tmp_path / "pool", num_pairs=3 * PER_SHARD, per_shard=PER_SHARD)
    shard = tmp_path / "pool" / "pool-000001.tar"
    _truncate(shard)
    caplog.set_level(logging.INFO)
    _score(tmp_path / "pool", tmp_path / "out")
    summary = next(line for line in caplog.messages if "pairs from 3 shards" in line)
    assert "1 unreadable shards" in summary and "1 sample skipped" in summary
    assert f"1 shard not read to the end: {shard} (truncated or unreadable after" in summary
    assert "The pairs after the damage point were not scored" in summary and "re-run" in summary


def test_select_prints_the_damage_its_scores_miss(damaged, tmp_path, caplog):
    _, out, _, shard = damaged
    caplog.set_level(logging.INFO)
    select_subset(out, tmp_path / "subset.npy", fraction=0.5)
    line = next(line for line in caplog.messages if "select:" in line)
    kept = len(read_scores(out)["ids"])
    assert f"{round(kept / 2)}/{kept} uids" in line
    assert "the scores miss damaged input: 1 sample skipped" in line
    assert f"1 shard not read to the end: {shard}" in line


def test_report_on_a_score_folder_counts_and_names_the_damage_of_its_manifest(damaged, tmp_path):
    _, out, _, shard = damaged
    page = build_report(out, tmp_path / "report.html", gallery=0).read_text("utf-8")
    assert "Problems (2)" in page  # the damaged shard and the skipped sample
    assert f"shard {shard}" in page and "not read to the end: truncated or unreadable after" in page
    assert "1 pool samples were skipped, not scored" in page
    row = page[page.index("<td>scores.npz</td>") :].split("</tr>")[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells[-2:] == ["1", "1"]  # skipped pairs, unreadable shards


# --------------------------------------------------------------------------------------------------------------
# select --reshard: the scores' uid field, unreadable samples named, a set others can read
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key2_pool(tmp_path_factory):
    """A pool whose uids are in the json field ``key2`` (no ``uid``); sample 4 has no ``key2``. Scored with
    ``uid_field="key2"``."""
    root = tmp_path_factory.mktemp("key2")
    (root / "pool").mkdir()
    original = write_pool(root / "src", num_pairs=2 * PER_SHARD, per_shard=2 * PER_SHARD)
    texts = {}
    with wds.ShardWriter(str(root / "pool" / "pool-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i, (uid, pair) in enumerate(sorted(original.items())):
            meta = {"other": i} if i == 4 else {"key2": uid + 5}
            sink.write({"__key__": f"s{i:06d}", "png": pair["png"], "txt": pair["text"].encode(),
                        "json": json.dumps(meta).encode()})  # fmt: skip
            if i != 4:
                texts[uid + 5] = pair["text"]
    _score(root / "pool", root / "out", uid_field="key2", max_skipped=1.0)  # 1 of 16 on purpose: over the 5 %
    return root, texts


def test_reshard_reads_the_uid_field_of_the_scores_and_publishes_a_readable_set(key2_pool, tmp_path):
    root, texts = key2_pool
    scores = read_scores(root / "out")
    assert sorted(scores["ids"].tolist()) == sorted(texts)
    set_dir = tmp_path / "subset"
    mask = os.umask(0o022)  # what most accounts have: the set must then be readable by others
    try:
        with pytest.warns(UserWarning, match="1 pool samples have no readable 'key2'"):
            select_subset(root / "out", tmp_path / "subset.npy", count=7, reshard=str(set_dir / "%04d.tar"),
                          maxcount=3)  # fmt: skip
    finally:
        os.umask(mask)
    chosen = np.load(tmp_path / "subset.npy")
    top = scores["ids"][np.lexsort((scores["ids"], -scores["scores"]))[:7]]
    assert sorted(chosen.tolist()) == sorted(top.tolist())
    pairs = list(WebDatasetPairs(str(set_dir), image_size=32, uid_field="key2"))
    assert sorted(p["id"] for p in pairs) == chosen.tolist()  # exactly the selected samples
    assert all(p["text"] == texts[p["id"]] for p in pairs)
    manifest = json.loads((set_dir / RESHARD_MANIFEST).read_text())
    assert manifest["uid_field"] == "key2" and manifest["samples"] == 7
    assert manifest["unreadable"]["count"] == 1  # the sample without key2, named
    assert manifest["unreadable"]["first"][0]["key"] == "s000004"
    assert "no 'key2' in its json" in manifest["unreadable"]["first"][0]["reason"]
    # readable by another account: the folder 0755, the files 0644 under umask 022
    assert stat.S_IMODE(set_dir.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in set_dir.iterdir()} == {0o644}


def test_reshard_with_a_uid_field_the_pool_lacks_names_the_unreadable_samples(key2_pool, tmp_path):
    root, _ = key2_pool
    with pytest.raises(
        ValueError,
        match=r"7 selected uids are not in the pool read with uid_field 'uid'.*"
        r"16 pool samples have no readable 'uid'.*s000000: no 'uid' in its json",
    ):
        select_subset(root / "out", tmp_path / "s.npy", count=7, reshard=str(tmp_path / "subset" / "%04d.tar"),
                      uid_field="uid")  # fmt: skip
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "subset").exists()


# --------------------------------------------------------------------------------------------------------------
# max_skipped: too many bad samples stop the merge
# --------------------------------------------------------------------------------------------------------------
def test_score_over_max_skipped_writes_no_scores_and_a_higher_limit_finishes_from_the_parts(tmp_path):
    from lightning_chips.engine import TooManySkippedError

    valid = write_pool(tmp_path / "pool", num_pairs=3 * PER_SHARD, per_shard=PER_SHARD, corrupt_image=3,
                       missing_caption=13)  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(TooManySkippedError, match=r"skipped 2 of the pool's 24 pairs \(8\.3%\).*max_skipped=0\.05"):
        _score(tmp_path / "pool", out)  # the default limit: 5 % of the pairs
    assert not (out / "scores.npz").exists() and len(list((out / "parts").glob("*.npz"))) == 3
    _score(tmp_path / "pool", out, max_skipped=0.1)  # resumes from the parts: only the merge is run again
    assert sorted(read_scores(out)["ids"].tolist()) == sorted(valid)
