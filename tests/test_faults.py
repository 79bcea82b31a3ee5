"""Bad input and numerical faults through the WebDataset pool and the offline score pass: skipped and counted
with the ids named, or a clear error before any work; never a silent drop."""

from __future__ import annotations

import copy
import io
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lightning_chips import OpenCLIPModule
from lightning_chips.data.webdataset import ShardReport, WebDatasetPairs
from lightning_chips.offline import read_scores, score_pool
from lightning_chips.scoring import CLIPScore, Scorer

from .conftest import TINY_VIT
from .shards import png_bytes


def _bomb_png() -> bytes:
    """A small file that decodes to more pixels than PIL's decompression-bomb limit."""
    buffer = io.BytesIO()
    Image.new("1", (Image.MAX_IMAGE_PIXELS // 10000 + 100, 10001)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path, samples) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _good(i: int, uid: int | None = None) -> dict:
    return {"__key__": f"k{i:04d}", "png": png_bytes(torch.rand(3, 16, 16)), "txt": f"caption {i}".encode(),
            "json": json.dumps({"uid": i if uid is None else uid}).encode()}  # fmt: skip


@pytest.fixture
def faulty(tmp_path):
    """Two shards: every kind of bad sample between good ones, and a uid repeated across the shards."""
    bad = [
        {"__key__": "zero", "png": b"", "txt": b"x", "json": b'{"uid": 901}'},
        {"__key__": "bomb", "png": _bomb_png(), "txt": b"x", "json": b'{"uid": 902}'},
        {"__key__": "garbage", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x", "json": b'{"uid": 903}'},
        {"__key__": "blank", "png": png_bytes(torch.rand(3, 8, 8)), "txt": b" \t\n", "json": b'{"uid": 904}'},
        {
            "__key__": "latin1",
            "png": png_bytes(torch.rand(3, 8, 8)),
            "txt": "caf\xe9".encode("latin-1"),
            "json": b'{"uid": 905}',
        },  # fmt: skip
        {"__key__": "nouid", "png": png_bytes(torch.rand(3, 8, 8)), "txt": b"x", "json": b'{"id": 906}'},
    ]
    _write(tmp_path / "a.tar", [_good(0), *bad[:3], _good(1), _good(2)])
    _write(tmp_path / "b.tar", [_good(3), *bad[3:], _good(4), _good(5, uid=1)])  # uid 1 again
    long_caption = {**_good(6), "txt": ("word " * 5000).encode()}
    _write(tmp_path / "c.tar", [long_caption])
    return tmp_path


EXPECTED_BAD = {
    "zero": "empty image file",
    "bomb": "undecodable image: DecompressionBomb",
    "garbage": "undecodable image",
    "blank": "empty caption",
    "latin1": "caption is not UTF-8",
    "nouid": "missing uid",
}


def test_every_bad_sample_is_skipped_with_its_key_and_reason(faulty):
    items = list(WebDatasetPairs(str(faulty), image_size=16, reports=True))
    reports = [i for i in items if isinstance(i, ShardReport)]
    bad = {key: reason for r in reports for key, reason in r.bad}
    assert set(bad) == set(EXPECTED_BAD)
    for key, reason in EXPECTED_BAD.items():
        assert bad[key].startswith(reason), (key, bad[key])
    ids = sorted(i["id"] for i in items if not isinstance(i, ShardReport))
    assert ids == [0, 1, 1, 2, 3, 4, 6]  # the duplicated uid is read twice; the merge reports it
    long = next(i for i in items if not isinstance(i, ShardReport) and i["id"] == 6)
    assert len(long["text"]) == len(("word " * 5000).strip())  # kept; the tokenizer truncates it


def test_score_reports_bad_samples_and_duplicates_and_keeps_the_first_score(faulty, tmp_path):
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="several shards"):
        score_pool(
            module, CLIPScore(), str(faulty), str(out), num_workers=0, image_size=32, trainer=trainer, max_skipped=1.0
        )  # a pool made of faults: every kind reported, over the default 5 % limit
    result = read_scores(out)
    assert result["ids"].tolist() == [0, 1, 2, 3, 4, 6]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == len(EXPECTED_BAD)
    assert manifest["duplicates"] == {"count": 1, "ids": [1]}
    # the duplicate keeps the score of its first shard (a.tar's k0001)
    part = np.load(next((out / "parts").glob("a.tar-*.npz")))
    assert result["scores"][1] == part["scores"][part["ids"] == 1][0]


class _Diverged(Scorer):
    name = "diverged"
    requires_target = False

    def prepare(self, endpoint, target, pool_sample) -> None:
        pass

    def score(self, batch):
        scores = torch.zeros(len(batch))
        scores[batch.ids == 2] = float("nan")
        return scores


def test_non_finite_scores_are_an_error_naming_the_ids(faulty, tmp_path):
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match=r"first ids: \[2\]"):
        score_pool(module, _Diverged(), str(faulty), str(tmp_path / "out"), num_workers=0, image_size=32,
                   trainer=trainer)  # fmt: skip
    assert not (tmp_path / "out" / "scores.npz").exists()


@pytest.mark.ddp
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_exception_on_one_rank_ends_the_ddp_scoring_job(tmp_path, failing_rank):
    """2 gloo ranks; one scorer raises mid-pass: the job exits non-zero with that error, bounded in time (no hang
    at the merge barrier), and no merged scores file is written."""
    import subprocess
    import sys
    from pathlib import Path

    from .shards import write_pool

    write_pool(tmp_path / "pool", num_pairs=48, per_shard=6)
    script = Path(__file__).parent / "scripts" / "score_fail_rank.py"
    try:  # a rank left waiting at the merge barrier would hang: the timeout is the property under test
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "pool"), str(tmp_path / "out"),
                               str(failing_rank)], capture_output=True, text=True, timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung after rank {failing_rank} failed (no exit within 240 s)")
    assert done.returncode != 0
    assert f"injected failure on rank {failing_rank}" in done.stderr + done.stdout
    assert not (tmp_path / "out" / "scores.npz").exists()


@pytest.mark.ddp
def test_ddp_ranks_with_different_weights_are_refused_before_scoring(tmp_path):
    """2 gloo ranks whose random models were seeded differently: `score` stops with the fix named (a common seed
    or pretrained weights), and writes no merged scores file."""
    import subprocess
    import sys
    from pathlib import Path

    from .shards import write_pool

    write_pool(tmp_path / "pool", num_pairs=24, per_shard=6)
    script = Path(__file__).parent / "scripts" / "score_fail_rank.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "pool"), str(tmp_path / "out"), "-1"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode != 0
    assert "hold different model weights" in done.stderr + done.stdout
    assert "--seed_everything" in done.stderr + done.stdout
    assert not (tmp_path / "out" / "scores.npz").exists()
