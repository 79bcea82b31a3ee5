"""Candidate rounds (``DataSelectionCallback(rescore=CandidateRescore(...))``): what they encode, that they fall back
to full rounds when the candidates would cover the pool, resume, and the YAML form (tiny fits, CPU). The 2-rank
DDP run of candidate rounds is in tests/test_ddp.py."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from lightning_chips import DataSelectionCallback, OpenCLIPModule, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.ranking import score_order
from lightning_chips.rescore import CandidateRescore, CandidateState, check_rescore, plan_candidates
from lightning_chips.scoring import CHIPS

from .conftest import TINY_VIT

POOL, FRACTION, BUDGET = 240, 0.3, 72
BROKEN = (3, 200)


class BrokenPairs(Dataset):
    """Built-in pairs of which the ones at ``broken`` fail to load every time."""

    def __init__(self, n: int, broken: tuple[int, ...] = ()) -> None:
        self.base, self.broken = TwoDomainPairs(n, noise_fraction=0.2, target_fraction=0.3), set(broken)
        self.group_labels = self.base.group_labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        if index in self.broken:
            raise OSError(f"pair {index} is unreadable")
        return self.base[index]


class CountingData(ScoredSubsetDataModule):
    """Records the dataset indices every scoring pass reads: ``("all" | "indexed", indices)``."""

    def __init__(self, pool: Dataset, **kwargs) -> None:
        super().__init__(pool, TwoDomainPairs(16, target_fraction=1.0, split="val"), batch_size=8, steps_per_round=4,
                         eval_batch_size=64, **kwargs)  # fmt: skip
        self.reads: list[tuple[str, np.ndarray]] = []

    def scoring_batches(self, rank, world):
        self.reads.append(("all", np.arange(self.pool_size())))
        return super().scoring_batches(rank, world)

    def indexed_batches(self, indices, rank, world):
        self.reads.append(("indexed", np.asarray(indices).copy()))
        return super().indexed_batches(indices, rank, world)


def _chips() -> CHIPS:
    return CHIPS(sketch_dim=96, bank_size=48, curvature_samples=96)


def _module() -> OpenCLIPModule:
    pl.seed_everything(0)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3)


def _fit(directory: Path, data, rescore, *, epochs=3, callbacks=(), ckpt_path=None, scorer=None, **kwargs):
    callback = DataSelectionCallback(scorer or _chips(), fraction=FRACTION, every_n_epochs=1, rescore=rescore,
                                     save_dir=str(directory / "rounds"), progress=False, **kwargs)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[callback, *callbacks],
                         logger=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory)  # fmt: skip
    trainer.fit(_module(), datamodule=data, ckpt_path=ckpt_path)
    return callback


def _round(directory: Path, r: int) -> dict[str, np.ndarray]:
    with np.load(directory / "rounds" / f"round_{r:04d}.npz") as f:
        return {k: f[k] for k in f.files}


# -- the policy and the plan ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rescore, match",
    [
        ({"widen": 0.5}, "widen` must be >= 1"),
        ({"explore": -0.1}, r"explore` must be a share of the pool in \[0, 1\]"),
        ({"anchor": 0.0}, r"anchor` must be a share of the pool in \(0, 1\]"),
        ({"explore": 1.5}, r"explore` must be a share"),
        ({"widen": True}, "must be a number"),
        ({"widen": 2, "explor": 0.1}, r"takes `widen`, `explore`, `anchor` and `min_anchor`, got \['explor'\]"),
        ({"min_anchor": 1.5}, r"min_anchor` must be an int >= 2"),
        ("some", "must be None or 'all'"),
        ({"mode": "stratified", "widen": 2}, "mode='stratified' sets label quotas from the whole pool"),
    ],
)
def test_a_bad_rescore_says_what_to_pass(rescore, match):
    kwargs = {"mode": rescore.pop("mode"), "rescore": rescore} if "mode" in rescore else {"rescore": rescore}
    with pytest.raises(ValueError, match=match):
        DataSelectionCallback("random", **kwargs)


def test_rescore_forms():
    assert check_rescore(None) is None and check_rescore("all") is None
    assert check_rescore({"widen": 3}) == CandidateRescore(widen=3.0, explore=0.025, anchor=0.025, min_anchor=512)
    assert CandidateRescore(2.0, 0.05, 0.1).bound(0.3, 100_000) == pytest.approx(0.75)
    assert CandidateRescore(2.0, 0.05, 0.1).bound(0.3, 4_000) == pytest.approx(0.65 + 512 / 4_000)  # the floor


def test_the_plan_holds_the_top_the_anchor_the_exploration_sample_and_the_retried_pairs():
    n, budget, policy = 1000, 300, CandidateRescore(2.0, 0.05, 0.04, min_anchor=2)
    ranked = np.random.default_rng(1).permutation(n)[:600]
    plans = [plan_candidates(policy, pool_size=n, ranked=ranked, unusable=np.array([7, 999]), budget=budget, round=r,
                             seed=11) for r in (3, 4)]  # fmt: skip
    explored = np.sort(np.random.default_rng([11, 3]).choice(n, size=50, replace=False))  # a pool sample's draw
    plan = plans[0]
    assert (plan.top, plan.anchored, plan.explored, plan.retried) == (600, 40, 50, 2)
    np.testing.assert_array_equal(plans[0].sample, plans[1].sample)  # the anchor prepares, the same every round
    assert len(plan.sample) == 40 and not np.array_equal(plan.sample, explored[:40])
    np.testing.assert_array_equal(plan.encode, np.unique(np.concatenate([ranked, plan.sample, explored, [7, 999]])))
    assert len(plan.encode) <= policy.bound(0.3, n) * n + 2
    assert not np.isin(explored, plans[1].encode).all()  # the exploration sample is drawn again each round
    # a smaller pool_sample takes a fixed part of the anchor, so nothing more is encoded
    small = [plan_candidates(policy, pool_size=n, ranked=ranked, unusable=np.array([], int), budget=budget,
                             round=r, seed=11, pool_sample=20) for r in (3, 4)]  # fmt: skip
    assert len(small[0].sample) == 20 and np.isin(small[0].sample, plan.sample).all()
    np.testing.assert_array_equal(small[0].sample, small[1].sample)
    # candidates that would cover the pool, or a ranking shorter than the widened budget: a full round
    assert plan_candidates(CandidateRescore(3.0, 0.05, 0.05, min_anchor=2), pool_size=n, ranked=np.arange(n),
                           unusable=np.array([], int), budget=budget, round=1, seed=0) is None  # fmt: skip
    assert plan_candidates(policy, pool_size=n, ranked=ranked[:599], unusable=np.array([], int), budget=budget,
                           round=1, seed=0) is None  # fmt: skip
    # the anchor's floor: at least min_anchor pairs, all of a smaller pool (then: a full round)
    floored = plan_candidates(CandidateRescore(1.0, 0.0, 0.01, min_anchor=100), pool_size=n, ranked=ranked,
                              unusable=np.array([], int), budget=budget, round=1, seed=0)  # fmt: skip
    assert floored.anchored == len(floored.sample) == 100
    assert plan_candidates(CandidateRescore(min_anchor=2 * n), pool_size=n, ranked=ranked, unusable=np.array([], int),
                           budget=budget, round=1, seed=0) is None  # fmt: skip


def test_the_state_keeps_unusable_pairs_until_they_are_scored():
    state = CandidateState.after_round(None, indices=np.array([0, 1, 2]), ids=np.array([10, 11, 12]),
                                       scores=np.array([0.1, 0.9, 0.5]), skipped_indices=np.array([3, 4]), keep=2,
                                       pool_size=6, round=0, full=True)  # fmt: skip
    np.testing.assert_array_equal(state.ranked, [1, 2])
    assert state.pool_pairs(6) == 4 and state.never_seen(8).tolist() == [3, 4, 6, 7]
    later = CandidateState.after_round(state, indices=np.array([1, 3]), ids=np.array([11, 13]),
                                       scores=np.array([0.2, 0.3]), skipped_indices=np.array([], int), keep=2,
                                       pool_size=6, round=1, full=False)  # fmt: skip
    assert later.unusable.tolist() == [4] and later.ranked.tolist() == [3, 1]
    restored = CandidateState.from_state_dict(later.state_dict())
    assert restored.ranked.tolist() == [3, 1] and restored.unusable.tolist() == [4] and restored.round == 1


# -- fits ----------------------------------------------------------------------------------------------------------
def test_candidate_rounds_encode_at_most_the_bound_and_keep_the_budget(tmp_path):
    policy = CandidateRescore(widen=1.5, explore=0.05, anchor=0.05, min_anchor=2)
    data = CountingData(BrokenPairs(POOL, BROKEN))
    callback = _fit(tmp_path, data, policy, group_by=["domain"])
    assert [kind for kind, _ in data.reads] == ["all", "indexed", "indexed"]  # round 0 reads the whole pool
    usable = POOL - len(BROKEN)
    budget = round(FRACTION * usable)
    for r in (1, 2):
        read = data.reads[r][1]
        assert len(np.unique(read)) == len(read) <= policy.bound(FRACTION, POOL) * POOL + len(BROKEN)
        assert set(BROKEN) <= set(read.tolist())  # the pairs that failed are tried again
        previous = _round(tmp_path, r - 1)
        ranking = score_order(previous["ids"], previous["scores"])
        top = previous["ids"][ranking[: round(policy.widen * budget)]]
        file = _round(tmp_path, r)
        pool_ids = data.pool.base.ids
        assert set(pool_ids[read].tolist()) - set(BROKEN) >= set(top.tolist())  # the last round's top is re-scored
        assert set(file["ids"].tolist()) == set(pool_ids[np.setdiff1d(read, BROKEN)].tolist())  # only these scored
        assert int(file["encoded"]) == len(read) == callback.history[r]["encoded"]
        assert int(file["pool_pairs"]) == usable and int(file["selected"].sum()) == budget  # the pool's budget
        assert 0 < float(file["fit_share"]) <= 1 and float(file["round_seconds"]) > 0
    # the anchor (a uniform draw with the seed, the same every round) prepared the scorer: the bank is in it
    anchor = np.random.default_rng([0, 2**32 - 1]).choice(POOL, size=round(0.05 * POOL), replace=False)
    assert set(callback.scorer.state.bank.ids.tolist()) <= set(data.pool.base.ids[anchor].tolist())
    assert callback.history[0]["encoded"] == POOL
    # the report counts the pool's pairs, not the candidates, and says which rounds scored a part of the pool
    from lightning_chips.report import build_report
    from lightning_chips.report_read import read_round, summarize

    page = build_report(tmp_path / "rounds").read_text()
    assert "Rounds 1, 2 scored a part of the pool (candidate rounds)" in page
    summary = summarize(read_round(1, tmp_path / "rounds" / "round_0001.npz", False, []), None, 0)
    assert (summary.pool_pairs, summary.size) == (usable, int(_round(tmp_path, 1)["encoded"]) - len(BROKEN))


def test_candidates_that_cover_the_pool_give_the_full_rounds(tmp_path):
    """widen x fraction + anchor + explore = 3 x 0.3 + 0.05 + 0.05 = 1: every pair is a candidate, so the rounds are
    full rounds."""
    full = CountingData(TwoDomainPairs(POOL, noise_fraction=0.2, target_fraction=0.3))
    _fit(tmp_path / "full", full, None)
    covering = CountingData(TwoDomainPairs(POOL, noise_fraction=0.2, target_fraction=0.3))
    _fit(tmp_path / "covering", covering, CandidateRescore(widen=3.0, explore=0.05, anchor=0.05, min_anchor=2))
    assert [kind for kind, _ in covering.reads] == ["all"] * 3
    for r in range(3):
        a, b = _round(tmp_path / "full", r), _round(tmp_path / "covering", r)
        for key in ("ids", "scores", "selected", "encoded"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class Record(pl.Callback):
    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        self.steps: list[tuple[int, list[int]]] = []
        self.fail_at = fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.fail_at == (trainer.current_epoch, batch_idx):
            raise RuntimeError("simulated crash")
        self.steps.append((trainer.current_epoch, batch["id"].tolist()))


def test_resume_after_a_crash_in_candidate_rounds_reproduces_the_uninterrupted_run(tmp_path):
    policy = CandidateRescore(widen=1.5, explore=0.05, anchor=0.05, min_anchor=2)

    def run(directory: Path, record: Record, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        data = CountingData(TwoDomainPairs(POOL, noise_fraction=0.2, target_fraction=0.3))
        _fit(directory, data, policy, epochs=4, callbacks=[record, checkpoint], ckpt_path=ckpt_path)
        return data

    full = Record()
    run(tmp_path / "full", full)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crash", Record(fail_at=(2, 1)))  # inside epoch 2, trained on candidate round 2's selection
    resumed = Record()
    data = run(tmp_path / "resume", resumed, ckpt_path=str(tmp_path / "crash" / "epoch=1.ckpt"))
    assert [kind for kind, _ in data.reads] == ["indexed"]  # the resumed fit's one round (3) is a candidate round
    assert resumed.steps == [step for step in full.steps if step[0] >= 2]
    a, b = _round(tmp_path / "full", 3), _round(tmp_path / "resume", 3)
    for key in ("ids", "scores", "selected", "encoded"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert int(a["encoded"]) < POOL


def test_yaml_sets_candidate_rounds(tmp_path):
    from lightning_chips.cli import build_cli

    quickstart = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    config = yaml.safe_load(quickstart.read_text())
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DataSelectionCallback")]
    callback["init_args"]["rescore"] = {"widen": 2.5, "explore": 0.1, "anchor": 0.05}
    path = tmp_path / "candidates.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    (built,) = [c for c in cli.trainer.callbacks if isinstance(c, DataSelectionCallback)]
    assert built.rescore == CandidateRescore(widen=2.5, explore=0.1, anchor=0.05, min_anchor=512)


def test_a_shard_pool_refuses_candidate_rounds_before_training(tmp_path):
    from lightning_chips.data import WebDatasetDataModule

    from .shards import write_pool

    write_pool(tmp_path / "pool", 16, per_shard=8)
    data = WebDatasetDataModule(str(tmp_path / "pool"), batch_size=4, steps_per_round=2, eval_batch_size=8)
    callback = DataSelectionCallback("random", fraction=0.5, rescore={"widen": 2}, save_dir="", progress=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="read by dataset index, which WebDatasetDataModule cannot do"):
        trainer.fit(_module(), datamodule=data)


def test_a_pool_sample_prepares_on_a_fixed_part_of_the_anchor_and_streams_the_candidates(tmp_path):
    """With ``pool_sample`` (streaming rounds), a candidate round prepares on that many pairs of the anchor, the
    same pairs every round, and streams only the candidates through the towers."""
    policy = CandidateRescore(widen=1.5, explore=0.05, anchor=0.1, min_anchor=2)
    data = CountingData(TwoDomainPairs(POOL, noise_fraction=0.2, target_fraction=0.3))
    callback = DataSelectionCallback(_chips(), fraction=FRACTION, every_n_epochs=1, rescore=policy, pool_sample=12,
                                     save_dir=str(tmp_path / "rounds"), progress=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_module(), datamodule=data)
    anchor = np.sort(np.random.default_rng([0, 2**32 - 1]).choice(POOL, size=round(0.1 * POOL), replace=False))
    part = np.sort(anchor[np.random.default_rng([0, 2**32 - 2]).choice(len(anchor), size=12, replace=False)])
    kinds = [kind for kind, _ in data.reads]
    assert kinds[0] == "all" and kinds[1:] == ["indexed", "indexed"] * 2  # per round: the sample, then the candidates
    for sample, candidates in (data.reads[1:3], data.reads[3:5]):
        np.testing.assert_array_equal(sample[1], part)
        assert np.isin(part, candidates[1]).all() and len(candidates[1]) <= policy.bound(FRACTION, POOL) * POOL
    assert set(callback.scorer.state.bank.ids.tolist()) <= set(data.pool.ids[part].tolist())
