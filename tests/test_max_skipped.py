"""``max_skipped``: a round that skips more than that share of the pool's pairs (they failed to load or the checks)
fails with the count, the share, the limit, how to raise it and the user's traceback; below it the pairs are only
skipped and warned (tiny fits, CPU)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.data import WebDatasetDataModule
from lightning_chips.data.checks import SkippedSample
from lightning_chips.engine import TooManySkippedError, check_skipped

from .conftest import TINY_VIT
from .shards import write_pool


class BuggyPool(Dataset):
    """Built-in pairs whose ``__getitem__`` has a deliberate bug: the items in ``broken`` have no caption in the
    lookup table it reads, so they raise ``KeyError``."""

    def __init__(self, n: int, broken: set[int]) -> None:
        self.base = TwoDomainPairs(n, target_fraction=0.3)
        self.captions = {i: self.base[i]["text"] for i in range(n) if i not in broken}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        return {**item, "text": self.captions[index]}  # the bug: KeyError for the broken items


def _fit(tmp_path, pool, max_epochs=1, **kwargs) -> DataSelectionCallback:
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)
    data = ScoredSubsetDataModule(pool, batch_size=8, steps_per_round=2, eval_batch_size=32)
    callback = DataSelectionCallback("random", fraction=0.3, save_dir=str(tmp_path / "rounds"), progress=False,
                                     **kwargs)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return callback


def test_a_loading_bug_on_30_percent_of_the_pool_fails_the_round_with_the_users_traceback(tmp_path):
    broken = {i for i in range(100) if i % 10 < 3}
    with pytest.raises(TooManySkippedError) as raised:
        _fit(tmp_path, BuggyPool(100, broken))
    message = str(raised.value)
    assert "Round 0 skipped 30 of the pool's 100 pairs (30.0%)" in message
    assert "max_skipped=0.05 (5.0%)" in message  # the limit in force
    assert "raise the limit with `max_skipped` (e.g. max_skipped=0.3" in message  # how to raise it
    assert "id None (index 0): failed to load: KeyError: 0" in message  # the first failing item
    assert "KeyError: 0" in message.splitlines()[-1]  # its traceback, ending with the original exception
    assert 'return {**item, "text": self.captions[index]}' in message  # the line of the user's code
    assert "test_max_skipped.py" in message
    assert not list((tmp_path / "rounds").glob("round_*.npz"))  # nothing selected from the biased pool


def test_a_few_skipped_pairs_below_the_limit_only_warn(tmp_path):
    with pytest.warns(UserWarning, match="round 0: skipped 2 pool pairs that could not be used"):
        callback = _fit(tmp_path, BuggyPool(100, {5, 50}))
    assert callback.history[0]["skipped"] == 2
    assert sorted(s.index for s in callback.skipped) == [5, 50]
    with np.load(tmp_path / "rounds" / "round_0000.npz") as f:
        assert sorted(f["bad_indices"].tolist()) == [5, 50]


def test_a_raised_limit_lets_a_known_bad_pool_through(tmp_path):
    callback = _fit(tmp_path, BuggyPool(100, {i for i in range(100) if i % 10 < 3}), max_skipped=0.3)
    assert callback.history[0]["skipped"] == 30  # exactly at the limit: allowed


def test_a_shard_pool_over_the_limit_names_the_first_reasons(tmp_path):
    """One undecodable image in 16 pairs (6.2 %) is over the default 5 %: the error names the sample and why."""
    write_pool(tmp_path / "pool", 16, per_shard=8, corrupt_image=3)
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=1e-3)
    data = WebDatasetDataModule(str(tmp_path / "pool"), batch_size=4, steps_per_round=2, eval_batch_size=8)
    callback = DataSelectionCallback("random", fraction=0.5, save_dir="", progress=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(TooManySkippedError, match=r"skipped 1 of the pool's 16 pairs \(6\.2%\)") as raised:
        trainer.fit(module, datamodule=data)
    assert "The first skipped pairs: uid 1000000000003 (key s000003 of" in str(raised.value)
    assert "undecodable image" in str(raised.value)


def test_duplicate_ids_do_not_count_and_the_limit_is_a_share():
    bad = [SkippedSample("failed to load: OSError: x", index=i) for i in range(5)]
    check_skipped(bad, 100, 0.05, round_=0)  # 5 of 100 = the limit: allowed
    check_skipped(bad, 100, None, round_=0)  # no limit (the engine's default)
    check_skipped([], 1, 0.0, round_=0)
    with pytest.raises(TooManySkippedError, match=r"skipped 5 of the pool's 99 pairs \(5\.1%\)"):
        check_skipped(bad, 99, 0.05, round_=3)
    with pytest.raises(TooManySkippedError, match="max_skipped=0 "):
        check_skipped(bad[:1], 10**6, 0.0, round_=0)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "5%"])
def test_max_skipped_is_validated_before_any_work(value):
    with pytest.raises(ValueError, match=r"`max_skipped` must be a share of the pool's pairs in \[0, 1\]"):
        DataSelectionCallback("random", max_skipped=value)
