"""One round, three entry points: the callback over a map-style pool, the callback over the same pairs as
WebDataset shards, and ``lightning-chips score`` give the same scores and the same selection, with bad samples,
duplicate ids and NaN scores (docs/selection.md, "One round")."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, WebDatasetDataModule
from lightning_chips.data.target import ListDataset
from lightning_chips.data.webdataset import WebDatasetPairs
from lightning_chips.offline import read_scores, score_pool
from lightning_chips.scoring import CHIPS, CLIPScore, NegCLIPLoss, NormSim, Scorer
from lightning_chips.selection import select

from .conftest import TINY_VIT
from .shards import write_pool

SCORERS = {
    "chips": lambda: CHIPS(
        sketch_dim=64,
        bank_size=24,
        curvature_samples=40,
        components=("alignment", "learnability", "relevance", "plausibility"),
    ),  # fmt: skip
    "clipscore": CLIPScore,
    "normsim": NormSim,
    "negclip": lambda: NegCLIPLoss(batch_size=16, repeats=3),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    write_pool(root / "pool", num_pairs=48, per_shard=10, corrupt_image=7, missing_caption=30)
    write_pool(root / "target", num_pairs=12, per_shard=12, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)


def _fit_round_zero(module, datamodule, scorer: Scorer, save: Path,
                    pool_sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    callback = DataSelectionCallback(scorer, fraction=0.3, every_n_epochs=1, pool_sample=pool_sample,
                                     save_dir=str(save), progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    with np.load(save / "round_0000.npz") as f:
        return f["ids"], f["scores"]


def _three_entry_points(pool: Path, target: Path, scorer, out: Path, pool_sample: int | None = None,
                       map_style: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Round 0's ids and scores through the map-style callback (the shards' valid pairs in shard order as a list),
    the streaming callback and ``score``."""
    results = {}
    if map_style:
        pool_pairs = list(WebDatasetPairs(str(pool), image_size=32))  # the valid pairs, decoded, in pool order
        target_pairs = list(WebDatasetPairs(str(target), image_size=32))
        results["map-style"] = _fit_round_zero(
            _module(), ScoredSubsetDataModule(ListDataset(pool_pairs), ListDataset(target_pairs), batch_size=8,
                                              steps_per_round=1, eval_batch_size=16),
            scorer(), out / "map", pool_sample,
        )  # fmt: skip
    results["streaming"] = _fit_round_zero(
        _module(), WebDatasetDataModule(str(pool), str(target), batch_size=8, steps_per_round=1, num_workers=0,
                                        eval_batch_size=16),
        scorer(), out / "stream", pool_sample,
    )  # fmt: skip
    offline = read_scores(score_pool(_module(), scorer(), str(pool), str(out / "offline"), target=str(target),
                                     batch_size=16, num_workers=0, pool_sample=pool_sample,
                                     trainer=pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                                        enable_model_summary=False)))  # fmt: skip
    results["offline"] = (offline["ids"], offline["scores"])
    return results


def _assert_agree(results: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    reference_ids, reference = results["offline"]
    chosen = set(select(reference_ids, reference, fraction=0.3).ids.tolist())
    for entry, (ids, scores) in results.items():
        order = np.argsort(ids)
        np.testing.assert_array_equal(ids[order], reference_ids, err_msg=entry)
        np.testing.assert_allclose(scores[order], reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max(),
                                   err_msg=entry)  # fmt: skip
        assert set(select(ids, scores, fraction=0.3).ids.tolist()) == chosen, entry


@pytest.mark.parametrize("name", list(SCORERS))
def test_map_style_streaming_and_offline_rounds_agree(data, tmp_path, name):
    results = _three_entry_points(data / "pool", data / "target", SCORERS[name], tmp_path)
    assert len(results["offline"][0]) == 46  # 48 pairs, one undecodable image, one missing caption
    _assert_agree(results)


def test_a_sampled_pool_sample_is_the_same_through_the_streaming_callback_and_score(data, tmp_path):
    """``pool_sample=20`` draws the same pairs with ``(seed, 0)`` for the streaming callback's round 0 and
    ``score``; the prepared CHIPS, and so every score, is the same."""
    results = _three_entry_points(data / "pool", data / "target", SCORERS["chips"], tmp_path, pool_sample=20,
                                  map_style=False)  # fmt: skip
    _assert_agree(results)
    whole = _three_entry_points(data / "pool", data / "target", SCORERS["chips"], tmp_path / "whole",
                                map_style=False)  # fmt: skip
    assert not np.allclose(whole["offline"][1], results["offline"][1])  # the sample matters: the check can fail


def test_duplicate_ids_keep_their_first_pair_through_every_entry_point(data, tmp_path):
    """Two later pairs repeat the uids of earlier pairs of other shards (different images and captions): every
    entry point scores each uid once, with the first pair's score (= the score of a pool without the repeats),
    and the selections agree."""
    write_pool(tmp_path / "pool", num_pairs=40, per_shard=10, duplicate_uids={25: 3, 33: 12})
    results = _three_entry_points(tmp_path / "pool", data / "target", SCORERS["chips"], tmp_path / "dup")
    _assert_agree(results)
    write_pool(tmp_path / "clean", num_pairs=40, per_shard=10)
    clean = list(WebDatasetPairs(str(tmp_path / "clean"), image_size=32))
    without = ListDataset([p for i, p in enumerate(clean) if i not in (25, 33)])
    target = ListDataset(list(WebDatasetPairs(str(data / "target"), image_size=32)))
    ids, scores = _fit_round_zero(_module(), ScoredSubsetDataModule(without, target, batch_size=8, steps_per_round=1,
                                                                    eval_batch_size=16),
                                  SCORERS["chips"](), tmp_path / "without")  # fmt: skip
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], results["offline"][0])
    np.testing.assert_allclose(scores[order], results["offline"][1], rtol=1e-4,
                               atol=1e-5 * np.abs(scores).max())  # fmt: skip
    with np.load(tmp_path / "dup" / "stream" / "round_0000.npz") as f:
        assert sorted(f["bad_ids"].tolist()) == [10**12 + 3, 10**12 + 12]


class _Diverged(Scorer):
    """NaN for one pair: what a diverged model gives."""

    requires_target = False

    def __init__(self, bad_id: int) -> None:
        self.bad_id = bad_id

    def prepare(self, endpoint, target, pool_sample, context=None) -> None:
        self.use_context(context)

    def score(self, batch):
        scores = batch.image.new_zeros(len(batch))
        scores[batch.ids == self.bad_id] = float("nan")
        return scores


def test_non_finite_scores_are_the_same_error_through_every_entry_point(data, tmp_path):
    pool_pairs = [p for p in WebDatasetPairs(str(data / "pool"), image_size=32)]
    bad_id = pool_pairs[3]["id"]
    match = rf"_Diverged gave non-finite scores in round 0 \(first ids: \[{bad_id}\]\)"
    with pytest.raises(FloatingPointError, match=match):
        pool = ScoredSubsetDataModule(ListDataset(pool_pairs), batch_size=8, steps_per_round=1, eval_batch_size=16)
        _fit_round_zero(_module(), pool, _Diverged(bad_id), tmp_path / "map")
    with pytest.raises(FloatingPointError, match=match):
        _fit_round_zero(_module(), WebDatasetDataModule(str(data / "pool"), batch_size=8, steps_per_round=1,
                                                        num_workers=0, eval_batch_size=16),
                        _Diverged(bad_id), tmp_path / "stream")  # fmt: skip
    with pytest.raises(FloatingPointError, match=match):
        score_pool(_module(), _Diverged(bad_id), str(data / "pool"), str(tmp_path / "offline"), num_workers=0,
                   trainer=pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                      enable_model_summary=False))  # fmt: skip
    assert not list(tmp_path.rglob("round_*.npz")) and not (tmp_path / "offline" / "scores.npz").exists()
