"""Offline ``score`` / ``select`` over WebDataset shards: coverage, bad-sample reports, equality with an in-memory
computation, DDP equality, resume after SIGKILL, exact subsets and resharding."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_chips import OpenCLIPModule, resolve_adapter
from lightning_chips.data import clip_normalize
from lightning_chips.data.subset import PairCollate
from lightning_chips.data.webdataset import WebDatasetPairs, expand_shards, image_transform
from lightning_chips.features import extract_features
from lightning_chips.offline import model_fingerprint, read_scores, score_pool
from lightning_chips.reshard import select_subset
from lightning_chips.scoring import CHIPS, CLIPScore

from .conftest import TINY_VIT
from .shards import write_pool

SCRIPT = Path(__file__).parent / "scripts" / "score_pool.py"
POOL_SAMPLE = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    valid = write_pool(root / "pool", num_pairs=60, per_shard=8, corrupt_image=5, missing_caption=22)
    write_pool(root / "target", num_pairs=16, per_shard=16, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root, valid


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip


def _chips() -> CHIPS:
    return CHIPS(sketch_dim=64, bank_size=32, curvature_samples=64)


def _in_memory_scores(module, root: Path, valid: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same scores computed without shards, workers or parts: decode the written bytes, extract features,
    prepare on the documented pool sample (``WebDatasetPairs.sample_pairs`` with ``(seed, round 0)``, whose draw
    tests/test_pool_sample.py checks; given to the scorer in id order, as the target)."""
    tokenizer = module.get_tokenizer()
    collate = PairCollate(tokenizer, clip_normalize())
    transform = image_transform(32)

    def pair(uid):
        image = transform(Image.open(io.BytesIO(valid[uid]["png"])).convert("RGB"))
        return {"image": image, "text": valid[uid]["text"], "id": uid}

    adapter = resolve_adapter(module)
    uids = sorted(valid)
    features = extract_features(adapter, DataLoader([pair(u) for u in uids], batch_size=16, collate_fn=collate))
    target = extract_features(
        adapter,
        DataLoader(
            list(WebDatasetPairs(str(root / "target"), image_size=32)), batch_size=16, collate_fn=collate
        ),  # fmt: skip
    )
    pool = WebDatasetPairs(str(root / "pool"), image_size=32)
    sample_ids = [p["id"] for p in pool.sample_pairs(POOL_SAMPLE, [seed, 0])]
    assert len(sample_ids) == len(set(sample_ids)) == POOL_SAMPLE
    sample_ids.sort()  # the scorer is prepared on the sample in id order
    target = target.index(torch.argsort(target.ids))
    position = {u: i for i, u in enumerate(uids)}
    sample = features.index(torch.tensor([position[u] for u in sample_ids]))
    scorer = _chips()
    scorer.prepare(adapter.endpoint(), target, sample)
    return np.asarray(uids), scorer.score(features).numpy()


def test_score_covers_every_valid_uid_once_reports_bad_samples_and_matches_in_memory(shards, tmp_path):
    root, valid = shards
    module = _module()
    path = score_pool(module, _chips(), str(root / "pool"), str(tmp_path / "out"), target=str(root / "target"),
                      batch_size=8, num_workers=2, pool_sample=POOL_SAMPLE, trainer=_trainer())  # fmt: skip
    result = read_scores(path)
    assert result["ids"].tolist() == sorted(valid)  # every valid uid, exactly once, sorted
    assert result["method"] == "CHIPS" and result["model_fingerprint"] == model_fingerprint(module.model)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 2 and manifest["scored"] == 58
    bad = {b["key"]: b["reason"] for shard in manifest["shards"].values() for b in shard["bad"]}
    assert set(bad) == {"s000005", "s000022"} and bad["s000022"] == "missing caption"
    ids, expected = _in_memory_scores(module, root, valid)
    np.testing.assert_array_equal(result["ids"], ids)
    np.testing.assert_allclose(result["scores"], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    rank0 = np.load(tmp_path / "out" / "scores-rank0.npz")
    np.testing.assert_array_equal(rank0["ids"], result["ids"])


def test_select_gives_exactly_k_sorted_uids_and_reshard_reads_back(shards, tmp_path):
    root, valid = shards
    scores = score_pool(_module(), CLIPScore(), str(root / "pool"), str(tmp_path / "out"), batch_size=16,
                        num_workers=0, trainer=_trainer())  # fmt: skip
    result = read_scores(scores)
    chosen = select_subset(tmp_path / "out", tmp_path / "subset.npy", count=13,
                           reshard=str(tmp_path / "subset" / "part-%04d.tar"), maxcount=5)  # fmt: skip
    saved = np.load(tmp_path / "subset.npy")
    np.testing.assert_array_equal(saved, chosen)
    assert len(saved) == 13 and (np.diff(saved) > 0).all()
    top = result["ids"][np.lexsort((result["ids"], -result["scores"]))[:13]]
    assert set(saved.tolist()) == set(top.tolist())
    reread = list(WebDatasetPairs(str(tmp_path / "subset"), image_size=32))
    assert sorted(p["id"] for p in reread) == saved.tolist()
    assert all(p["text"] == valid[p["id"]]["text"] for p in reread)
    assert len(expand_shards(str(tmp_path / "subset"))) == 3  # 13 samples, 5 per shard
    fraction = select_subset(scores, tmp_path / "f.npy", fraction=0.25)
    assert len(fraction) == round(0.25 * 58)
    with pytest.raises(ValueError, match="exactly one"):
        select_subset(scores, tmp_path / "x.npy", fraction=0.2, count=3)
    with pytest.raises(ValueError, match="count"):
        select_subset(scores, tmp_path / "x.npy", count=59)


def test_output_of_another_run_is_refused(shards, tmp_path):
    root, _ = shards
    score_pool(_module(), CLIPScore(), str(root / "pool"), str(tmp_path / "out"), num_workers=0, trainer=_trainer())
    with pytest.raises(ValueError, match="another run"):
        score_pool(_module(), _chips(), str(root / "pool"), str(tmp_path / "out"), target=str(root / "target"),
                   num_workers=0, pool_sample=POOL_SAMPLE, trainer=_trainer())  # fmt: skip


def test_scorer_that_needs_a_target_fails_before_any_work(shards, tmp_path):
    root, _ = shards
    with pytest.raises(ValueError, match="needs target"):
        score_pool(_module(), _chips(), str(root / "pool"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _script(root: Path, out: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), str(root / "pool"), str(root / "target"), str(out)]
    return subprocess.run(args + ([str(kill_after)] if kill_after else []), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_killed_score_resumes_to_the_same_final_file(shards, tmp_path):
    root, _ = shards
    killed = _script(root, tmp_path / "out", kill_after=3)
    assert killed.returncode == -9  # SIGKILL after the third shard's part was written
    assert not (tmp_path / "out" / "scores.npz").exists()
    assert len(list((tmp_path / "out" / "parts").glob("*.npz"))) == 3
    resumed = _script(root, tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3/8 shards already scored" in resumed.stderr + resumed.stdout
    fresh = _script(root, tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    a, b = read_scores(tmp_path / "out"), read_scores(tmp_path / "fresh")
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-5 * np.abs(b["scores"]).max())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["scored"] == len(b["ids"])


def _cli_score(root: Path, out: Path, devices: int) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "lightning_chips", "score", "--pool", str(root / "pool"),
        "--target", str(root / "target"), "--output", str(out), "--model", "OpenCLIPModule",
        "--model.model_config", json.dumps(TINY_VIT), "--scorer", "chips", "--scorer.sketch_dim", "64",
        "--scorer.bank_size", "32", "--scorer.curvature_samples", "64", "--batch_size", "8",
        "--num_workers", "1", "--worker_start_method", "spawn", "--pool_sample", str(POOL_SAMPLE),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    return subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=out.parent)


@pytest.mark.ddp
def test_ddp_score_gives_the_single_process_file(shards, tmp_path):
    """2 gloo ranks with spawned dataloader workers write the same merged scores as one process."""
    root, valid = shards
    single = _cli_score(root, tmp_path / "one", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _cli_score(root, tmp_path / "two", 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = read_scores(tmp_path / "one"), read_scores(tmp_path / "two")
    assert a["ids"].tolist() == b["ids"].tolist() == sorted(valid)
    assert a["model_fingerprint"] == b["model_fingerprint"]
    np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-5, atol=1e-5 * np.abs(a["scores"]).max())
    ranks = [np.load(tmp_path / "two" / f"scores-rank{r}.npz")["ids"] for r in range(2)]
    assert len(set(ranks[0]) & set(ranks[1])) == 0 and len(ranks[0]) > 0 and len(ranks[1]) > 0
    # select from the CLI as well
    out = subprocess.run([sys.executable, "-m", "lightning_chips", "select", "--scores", str(tmp_path / "two"),
                          "--count", "7", "--output", str(tmp_path / "s.npy")], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(np.load(tmp_path / "s.npy")) == 7


def test_cli_runs_score_and_select_from_yaml(shards, tmp_path):
    from lightning_chips.cli import main

    root, valid = shards
    config = tmp_path / "score.yaml"
    config.write_text(
        "model:\n  class_path: lightning_chips.OpenCLIPModule\n"
        f"  init_args:\n    model_config: {json.dumps(TINY_VIT)}\n"
        f"scorer: clipscore\npool: {root / 'pool'}\noutput: {tmp_path / 'out'}\nnum_workers: 0\n"
        "pool_sample: null\ntrainer:\n  accelerator: cpu\n  enable_progress_bar: false\n"
    )
    main(["score", "--config", str(config), "--batch_size", "32"])
    assert read_scores(tmp_path / "out")["ids"].tolist() == sorted(valid)
    main(["select", "--scores", str(tmp_path / "out"), "--fraction", "0.5", "--output", str(tmp_path / "s.npy")])
    assert len(np.load(tmp_path / "s.npy")) == 29


def _registered(name: str):
    from lightning_chips.scoring import build_scorer

    if name == "clip_powered":
        return build_scorer(name, classnames=["circle", "cell"], labels="zeroshot")
    if name == "chain":
        return build_scorer(name, first=CLIPScore(), second=_chips(), keep_fraction=0.5)
    if name == "intersect":
        return build_scorer(name, scorers=[CLIPScore(), _chips()], fractions=[0.5, 0.5])
    if name == "chips":
        return _chips()
    return build_scorer(name)


@pytest.mark.parametrize("name", sorted(__import__("lightning_chips.scoring", fromlist=["SCORERS"]).SCORERS))
def test_every_registered_scorer_scores_shards(shards, tmp_path, name):
    """Set-level scorers included (prepared on the whole pool), and CLIP-powered, which trains in prepare under
    the predict loop's inference mode."""
    root, valid = shards
    path = score_pool(_module(), _registered(name), str(root / "pool"), str(tmp_path / name),
                      target=str(root / "target"), batch_size=32, num_workers=0, pool_sample=None,
                      trainer=_trainer())  # fmt: skip
    result = read_scores(path)
    assert result["ids"].tolist() == sorted(valid)
    assert np.isfinite(result["scores"]).all()


def test_offline_tracin_weights_its_scores_by_the_given_learning_rate(shards, tmp_path):
    """One checkpoint: TracIn = learning rate x Dot, with the rate passed to `score` or, by default, the model's."""
    from lightning_chips.scoring import Dot, TracIn

    root, _ = shards
    common = dict(target=str(root / "target"), num_workers=0, pool_sample=POOL_SAMPLE)
    dot = read_scores(score_pool(_module(), Dot(bank_size=16), str(root / "pool"), str(tmp_path / "dot"),
                                 trainer=_trainer(), **common))  # fmt: skip
    given = read_scores(score_pool(_module(), TracIn(bank_size=16), str(root / "pool"), str(tmp_path / "given"),
                                   trainer=_trainer(), learning_rate=0.25, **common))  # fmt: skip
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)
    default = read_scores(score_pool(module, TracIn(bank_size=16), str(root / "pool"), str(tmp_path / "default"),
                                     trainer=_trainer(), **common))  # fmt: skip
    scale = np.abs(dot["scores"]).max()
    np.testing.assert_allclose(given["scores"], 0.25 * dot["scores"], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(default["scores"], 2e-3 * dot["scores"], rtol=1e-5, atol=1e-8 * scale)
    with pytest.raises(ValueError, match="learning_rate"):
        score_pool(_module(), TracIn(), str(root / "pool"), str(tmp_path / "bad"), learning_rate=0.0, **common)
