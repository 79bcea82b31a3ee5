"""One round, three entry points: the callback over a map-style pool, the callback over the same pairs as
WebDataset shards, and ``lightning-chips score`` give the same scores and the same selection (docs/selection.md,
"One round")."""

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


def _fit_round_zero(module, datamodule, scorer: Scorer, save: Path) -> tuple[np.ndarray, np.ndarray]:
    callback = DataSelectionCallback(scorer, fraction=0.3, every_n_epochs=1, pool_sample=None, save_dir=str(save),
                                     progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    with np.load(save / "round_0000.npz") as f:
        return f["ids"], f["scores"]


@pytest.mark.parametrize("name", list(SCORERS))
def test_map_style_streaming_and_offline_rounds_agree(data, tmp_path, name):
    pool_pairs = [p for p in WebDatasetPairs(str(data / "pool"), image_size=32)]  # the valid pairs, decoded
    target_pairs = [p for p in WebDatasetPairs(str(data / "target"), image_size=32)]
    results = {}
    results["map-style"] = _fit_round_zero(
        _module(),
        ScoredSubsetDataModule(
            ListDataset(pool_pairs), ListDataset(target_pairs), batch_size=8, steps_per_round=1, eval_batch_size=16
        ),  # fmt: skip
        SCORERS[name](),
        tmp_path / "map",
    )
    results["streaming"] = _fit_round_zero(
        _module(),
        WebDatasetDataModule(
            str(data / "pool"), str(data / "target"), batch_size=8, steps_per_round=1, num_workers=0, eval_batch_size=16
        ),  # fmt: skip
        SCORERS[name](),
        tmp_path / "stream",
    )
    offline = read_scores(score_pool(_module(), SCORERS[name](), str(data / "pool"), str(tmp_path / "offline"),
                                     target=str(data / "target"), batch_size=16, num_workers=0, pool_sample=None,
                                     trainer=pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                                        enable_model_summary=False)))  # fmt: skip
    results["offline"] = (offline["ids"], offline["scores"])
    reference_ids, reference = results["offline"]
    assert len(reference_ids) == len(pool_pairs)
    chosen = set(select(reference_ids, reference, fraction=0.3).ids.tolist())
    for entry, (ids, scores) in results.items():
        order = np.argsort(ids)
        np.testing.assert_array_equal(ids[order], reference_ids, err_msg=entry)
        np.testing.assert_allclose(scores[order], reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max(),
                                   err_msg=entry)  # fmt: skip
        assert set(select(ids, scores, fraction=0.3).ids.tolist()) == chosen, entry


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
