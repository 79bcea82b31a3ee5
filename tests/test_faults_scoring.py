"""Faults in what a scorer is prepared on: a singular curvature, an empty or one-class target, a pool smaller than
a batch or a bank, and NaN / inf features. Each is either handled with a documented result or a clear error before
any work, never a crash deep inside (an IndexError, a shape error, a Cholesky failure) or silent NaN scores."""

from __future__ import annotations

import copy
import json
import warnings

import lightning.pytorch as pl
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from lightning_chips import OpenCLIPModule
from lightning_chips.adapters import resolve_adapter
from lightning_chips.data import TwoDomainPairs
from lightning_chips.features import PairFeatures, extract_features
from lightning_chips.functional import chips_prepare
from lightning_chips.functional.clip_powered import clip_powered_select
from lightning_chips.offline import read_scores, score_pool
from lightning_chips.reshard import select_subset
from lightning_chips.scoring import (
    CHIPS,
    SCORERS,
    TRAK,
    Chain,
    ClipCov,
    ClipPowered,
    CLIPScore,
    Intersect,
    NegCLIPLoss,
    NormSim,
    RoundContext,
    Scorer,
    build_scorer,
)
from lightning_chips.selection import select

from .conftest import TINY_VIT
from .shards import png_bytes, write_pool

TARGET_SCORERS = ["chain", "chips", "dot", "intersect", "normsim", "tracin", "trak"]
"""Registered scorers that read the target (the composites through NormSim / CHIPS)."""


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    """A tiny open_clip model, its end point, and real features of a small pool and target (ids from the data)."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**copy.deepcopy(TINY_VIT)).eval()
    adapter = resolve_adapter(model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=32)  # noqa: E731
    pool = extract_features(adapter, loader(TwoDomainPairs(40, target_fraction=0.3, tokenizer=tokenizer)))
    target = extract_features(adapter, loader(TwoDomainPairs(6, target_fraction=1.0, split="val", tokenizer=tokenizer)))

    def encode(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)

    return adapter.endpoint().detach(), pool, target, encode


def _scorer(name: str, **kwargs) -> Scorer:
    """A small, fast instance of a registered scorer."""
    small = {
        "chips": lambda: CHIPS(sketch_dim=64, bank_size=16, curvature_samples=32, **kwargs),
        "trak": lambda: build_scorer("trak", sketch_dim=64, bank_size=16, train_samples=32, **kwargs),
        "dot": lambda: build_scorer("dot", bank_size=16, **kwargs),
        "tracin": lambda: build_scorer("tracin", bank_size=16, **kwargs),
        "chain": lambda: Chain(NegCLIPLoss(batch_size=16, repeats=2), NormSim(), keep_fraction=0.5),
        "intersect": lambda: Intersect(
            [CLIPScore(), CHIPS(sketch_dim=64, bank_size=16, curvature_samples=32)], [0.5, 0.5]
        ),
        "clip_powered": lambda: ClipPowered(["circle", "cell"], labels="zeroshot", adapter_epochs=1, **kwargs),
        "negclip": lambda: NegCLIPLoss(batch_size=16, repeats=2),
    }
    return small[name]() if name in small else build_scorer(name, **kwargs)


def _prepare(scorer: Scorer, endpoint, target, pool, encode, round_: int = 0) -> torch.Tensor:
    scorer.prepare(endpoint, target, pool, RoundContext(round=round_, text_encoder=encode))
    return torch.cat([scorer.score(batch).double().cpu() for batch in pool.batches(16)])


def _with(features: PairFeatures, row: int, side: str, value: float) -> PairFeatures:
    """A copy with one entry of row ``row`` of the ``side`` features set to ``value``."""
    image, text = features.image.clone(), features.text.clone()
    (image if side == "image" else text)[row, 3] = value
    return PairFeatures(features.ids, image, text, features.labels)


def _module() -> OpenCLIPModule:
    pl.seed_everything(0, verbose=False)
    return OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip


def _offline(name: str) -> Scorer:
    """Registered scorers for the offline pass, with their defaults where they are fast (bank, sample, sketch)."""
    if name == "clip_powered":
        return ClipPowered(["circle", "cell"], labels="zeroshot")
    if name == "chain":
        return Chain(CLIPScore(), CHIPS(), keep_fraction=0.5)
    if name == "intersect":
        return Intersect([CLIPScore(), CHIPS()], [0.5, 0.5])
    return build_scorer(name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A 3-pair pool (one shard, under one batch, the pool sample and every bank), a 1-pair pool, a 12-pair pool
    and targets of one pair, of that pair three times (new uids), and of no usable pair."""
    root = tmp_path_factory.mktemp("faults_scoring")
    small = write_pool(root / "pool3", num_pairs=3, per_shard=8)
    single = write_pool(root / "pool1", num_pairs=1, per_shard=8, uid_offset=5 * 10**12)
    pool12 = write_pool(root / "pool12", num_pairs=12, per_shard=6, uid_offset=7 * 10**12)
    one = write_pool(root / "target1", num_pairs=1, per_shard=8, uid_offset=0, target_fraction=1.0, split="val",
                     prefix="target")  # fmt: skip
    (pair,) = one.values()
    with wds.TarWriter(str(root / "target1x3.tar")) as sink:
        for uid in (11, 12, 13):
            sink.write({"__key__": f"t{uid}", "png": pair["png"], "txt": pair["text"].encode(),
                        "json": json.dumps({"uid": uid}).encode()})  # fmt: skip
    with wds.TarWriter(str(root / "target_all_bad.tar")) as sink:
        sink.write({"__key__": "zero", "png": b"", "txt": b"x", "json": b'{"uid": 1}'})
        sink.write({"__key__": "blank", "png": png_bytes(torch.rand(3, 8, 8)), "txt": b" ", "json": b'{"uid": 2}'})
    (root / "target_empty_folder").mkdir()
    return root, {"pool3": small, "pool1": single, "pool12": pool12}


# --------------------------------------------------------------------------------------------------------------
# 1. a singular curvature falls back to more damping, with a warning naming it
# --------------------------------------------------------------------------------------------------------------
def _degenerate(pool: PairFeatures, kind: str) -> PairFeatures:
    """Pool features whose curvature is singular: one pair repeated, or pairs spanning a 2-d subspace."""
    n = len(pool)
    if kind == "identical":
        return PairFeatures(pool.ids, pool.image[:1].repeat(n, 1), pool.text[:1].repeat(n, 1))
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n, 2, generator=g)
    return PairFeatures(pool.ids, mix @ pool.image[:2], mix @ pool.text[:2])


SOLVERS = {
    "chips-sketch-f64": lambda d: CHIPS(solver="sketch", sketch_dim=64, damping=d, bank_size=16, curvature_samples=32),
    "chips-sketch-f32": lambda d: CHIPS(
        solver="sketch", sketch_dim=64, damping=d, bank_size=16, curvature_samples=32, dtype="float32"
    ),
    "chips-kernel-f64": lambda d: CHIPS(solver="kernel", damping=d, bank_size=16, curvature_samples=32),
    "chips-kernel-f32": lambda d: CHIPS(
        solver="kernel", damping=d, bank_size=16, curvature_samples=32, dtype="float32"
    ),
    "trak-sketch-f64": lambda d: TRAK(sketch_dim=64, damping=d, bank_size=16, train_samples=32),
}


@pytest.mark.parametrize("kind", ["identical", "rank2"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_singular_curvature_falls_back_to_more_damping_with_a_warning(clip, solver, kind):
    """Damping 1e-300 (numerically zero; the constructors reject 0) on a pool whose curvature is singular: the
    solve warns with the damping it used, the scores are finite, and they are the scores of a run given that
    damping directly (which then factorises without a warning). In float32 the old absolute retry schedule
    (1e-12 .. 1e-6) never reached the rounding scale and ended in 'stays singular'."""
    endpoint, pool, target, encode = clip
    degenerate = _degenerate(pool, kind)
    with pytest.warns(UserWarning, match="singular or indefinite with damping 1e-300") as record:
        fallback = _prepare(SOLVERS[solver](1e-300), endpoint, target, degenerate, encode)
    scorer = SOLVERS[solver](1e-300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer.prepare(endpoint, target, degenerate)
    used = scorer.state.damping
    assert used > 1e-20
    messages = [str(w.message) for w in record if "singular" in str(w.message)]
    assert len(messages) == 1 and f"solved with damping {used:.6g} instead" in messages[0], messages
    assert torch.isfinite(fallback).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the used damping factorises at once: no second warning
        direct = _prepare(SOLVERS[solver](used), endpoint, target, degenerate, encode)
    torch.testing.assert_close(fallback, direct, rtol=1e-6, atol=1e-9)


def test_a_non_finite_curvature_is_a_floating_point_error_not_singular(clip):
    """The functional path (no scorer in front of it): NaN features are named, not reported as 'singular'."""
    endpoint, pool, target, _ = clip
    bad = _with(pool, 5, "text", float("nan"))
    with pytest.raises(FloatingPointError, match=rf"pool ids \[{int(pool.ids[5])}\]"):
        chips_prepare(endpoint, target.image, target.text, bad.image, bad.text, bad.ids, sketch_dim=64, bank_size=16)


# --------------------------------------------------------------------------------------------------------------
# 2. an empty target; a one-class target
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["none", "zero pairs"])
@pytest.mark.parametrize("name", TARGET_SCORERS)
def test_an_empty_target_is_a_value_error_naming_what_to_pass_before_any_work(clip, name, empty):
    endpoint, pool, target, encode = clip
    scorer = _scorer(name)
    assert scorer.requires_target
    given = None if empty == "none" else target.index(slice(0, 0))
    with pytest.raises(ValueError, match=r"needs target pairs .*pass `target`"):
        scorer.prepare(endpoint, given, pool, RoundContext(text_encoder=encode))
    if name == "chain":  # the filter (negCLIPLoss) needs no target, but the error comes before it runs
        assert scorer.first._lookup is None


@pytest.mark.parametrize("name", sorted(set(SCORERS) - set(TARGET_SCORERS)))
def test_scorers_without_a_target_are_not_blocked_by_an_empty_one(clip, name):
    endpoint, pool, target, encode = clip
    scorer = _scorer(name)
    assert not scorer.requires_target
    empty = _prepare(scorer, endpoint, target.index(slice(0, 0)), pool, encode)
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(_prepare(_scorer(name), endpoint, None, pool, encode), empty)


@pytest.mark.parametrize("name", TARGET_SCORERS)
def test_a_one_pair_target_scores_like_that_pair_repeated(clip, name):
    """The smallest one-class target: a single pair. Its scores are finite, not constant, and those of a target
    holding that pair three times (the mean target gradient, the target embedding means and NormSim's maximum
    do not change). CHIPS with its paper components: the plausibility reference is trained on the target pairs,
    and three copies of a pair are each other's negatives there, so it differs by design."""
    endpoint, pool, target, encode = clip
    kwargs = {"components": "paper"} if name == "chips" else {}
    one = target.index(slice(0, 1))
    one = PairFeatures(one.ids, one.image, one.text, torch.zeros(1, dtype=torch.int64))
    repeated = PairFeatures(torch.tensor([7, 8, 9]), one.image.repeat(3, 1), one.text.repeat(3, 1),
                            torch.zeros(3, dtype=torch.int64))  # fmt: skip
    scores = _prepare(_scorer(name, **kwargs), endpoint, one, pool, encode)
    assert torch.isfinite(scores).all() and scores.std() > 0
    again = _prepare(_scorer(name, **kwargs), endpoint, repeated, pool, encode)
    torch.testing.assert_close(scores, again, rtol=1e-6, atol=1e-6)  # NormSim embeds in float32


@pytest.mark.parametrize("classes", ["zeroshot", "labels", "kmeans"])
def test_clipcov_with_one_class_ranks_the_whole_pool_and_keeps_exactly_the_budget(clip, classes):
    """One class (one class name for zero-shot labels, one label, or one k-means cluster): a pair scores
    ``1 - (rank + 0.5) / N`` with its rank in the single greedy order, so the scores are exactly those N values
    and every budget is met exactly."""
    endpoint, pool, _, encode = clip
    labelled = PairFeatures(pool.ids, pool.image, pool.text, torch.zeros(len(pool), dtype=torch.int64))
    scorer = ClipCov(classes=classes, classnames=["circle"], num_clusters=1)
    scores = _prepare(scorer, endpoint, None, labelled, encode)
    n = len(pool)
    expected = 1.0 - (torch.arange(n, dtype=torch.float64) + 0.5) / n
    torch.testing.assert_close(torch.sort(scores, descending=True).values, expected)
    for budget in (1, 7, n):
        assert len(select(pool.ids.numpy(), scores.numpy(), count=budget)) == budget


@pytest.mark.parametrize("labels", ["zeroshot", "labels"])
def test_clip_powered_with_one_class_keeps_exactly_the_budget_of_its_closed_form(clip, labels):
    """One class name: every pair gets label 0; the scorer's top-k is the closed-form CLIP-powered selection
    with all-zero labels, for every budget."""
    endpoint, pool, _, encode = clip
    labelled = PairFeatures(pool.ids, pool.image, pool.text, torch.zeros(len(pool), dtype=torch.int64))
    scorer = ClipPowered(["circle"], labels=labels, adapter_epochs=2, neighbours=8)
    scores = _prepare(scorer, endpoint, None, labelled, encode)
    assert torch.isfinite(scores).all()
    x = endpoint.embed_image(pool.image).double()
    prompts = F.normalize(encode(["a photo of a circle."]).double(), dim=-1)
    for budget in (1, 7, len(pool)):
        chosen = select(pool.ids.numpy(), scores.numpy(), count=budget)
        assert len(chosen) == budget
        reference = clip_powered_select(x, prompts, torch.zeros(len(pool), dtype=torch.int64), budget,
                                        adapter_epochs=2, neighbours=8)  # fmt: skip
        assert sorted(chosen.ids.tolist()) == sorted(pool.ids[reference].tolist())


@pytest.mark.parametrize("target", ["target_all_bad.tar", "target_empty_folder", "missing.tar"])
def test_score_with_an_unusable_target_fails_before_any_file_is_written(shards, tmp_path, target):
    root, _ = shards
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"The target .*(holds no usable|cannot be read).*Pass `target`"):
        score_pool(_module(), CHIPS(), str(root / "pool3"), str(out), target=str(root / target), num_workers=0,
                   trainer=_trainer())  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("name", TARGET_SCORERS)
def test_score_with_an_empty_target_fails_before_any_file_is_written_for_every_target_scorer(shards, tmp_path, name):
    root, _ = shards
    out = tmp_path / name
    with pytest.raises(ValueError, match=r"holds no usable image-caption pair .*Pass `target`"):
        score_pool(_module(), _offline(name), str(root / "pool3"), str(out), target=str(root / "target_all_bad.tar"),
                   num_workers=0, trainer=_trainer())  # fmt: skip
    with pytest.raises(ValueError, match="needs target pairs"):
        score_pool(_module(), _offline(name), str(root / "pool3"), str(out), num_workers=0, trainer=_trainer())
    assert not out.exists()


@pytest.mark.parametrize("name", ["chips", "normsim", "trak"])
def test_score_with_a_one_pair_target_covers_the_pool_like_that_pair_repeated(shards, tmp_path, name):
    root, valid = shards
    runs = {}
    for target in ("target-000000.tar", "target1x3.tar"):
        spec = root / "target1" / target if target.startswith("target-") else root / target
        scorer = CHIPS(components="paper") if name == "chips" else _offline(name)  # paper: see the test above
        path = score_pool(_module(), scorer, str(root / "pool12"), str(tmp_path / target), target=str(spec),
                          batch_size=8, num_workers=0, trainer=_trainer())  # fmt: skip
        runs[target] = read_scores(path)
    one, three = runs["target-000000.tar"], runs["target1x3.tar"]
    assert one["ids"].tolist() == sorted(valid["pool12"])
    assert np.isfinite(one["scores"]).all() and one["scores"].std() > 0
    np.testing.assert_allclose(one["scores"], three["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["clipcov", "clip_powered"])
def test_score_with_one_class_name_keeps_exactly_the_budget(shards, tmp_path, name):
    root, valid = shards
    scorer = ClipCov(classes="zeroshot", classnames=["circle"]) if name == "clipcov" else ClipPowered(
        ["circle"], labels="zeroshot")  # fmt: skip
    path = score_pool(_module(), scorer, str(root / "pool12"), str(tmp_path / "out"), batch_size=8, num_workers=0,
                      pool_sample=None, trainer=_trainer())  # fmt: skip
    result = read_scores(path)
    assert result["ids"].tolist() == sorted(valid["pool12"]) and np.isfinite(result["scores"]).all()
    if name == "clipcov":  # one class: the scores are the N rank values of one greedy order
        n = len(valid["pool12"])
        np.testing.assert_allclose(np.sort(result["scores"])[::-1], 1.0 - (np.arange(n) + 0.5) / n, rtol=1e-6)
    for count in (1, 5, len(valid["pool12"])):
        assert len(select_subset(path, tmp_path / f"s{count}.npy", count=count)) == count


# --------------------------------------------------------------------------------------------------------------
# 3. a pool smaller than one batch, the pool sample and the bank
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCORERS))
def test_score_over_a_pool_smaller_than_a_batch_and_the_bank_covers_every_uid(shards, tmp_path, name):
    """3 pairs against batch_size 256, pool_sample 8192 and the scorers' default banks / curvature samples."""
    root, valid = shards
    path = score_pool(_module(), _offline(name), str(root / "pool3"), str(tmp_path / name),
                      target=str(root / "target1"), batch_size=256, pool_sample=8192, num_workers=0,
                      trainer=_trainer())  # fmt: skip
    result = read_scores(path)
    assert result["ids"].tolist() == sorted(valid["pool3"])
    assert np.isfinite(result["scores"]).all()
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    assert manifest["scored"] == 3 and manifest["skipped"] == 0


@pytest.mark.parametrize("name", ["chips", "clipscore", "dot", "negclip", "normsim", "trak"])
def test_score_over_a_one_pair_pool_scores_it_or_says_why_not(shards, tmp_path, name):
    """A single pair: scorers that need no negative score it; CHIPS (a pair needs another as its negative)
    refuses with that reason, and no scores file is written."""
    root, valid = shards
    run = lambda: score_pool(_module(), _offline(name), str(root / "pool1"), str(tmp_path / name),  # noqa: E731
                             target=str(root / "target1"), num_workers=0, trainer=_trainer())  # fmt: skip
    if name == "chips":
        with pytest.raises(ValueError, match="at least 2 pool pairs"):
            run()
        assert not (tmp_path / name / "scores.npz").exists()
        return
    result = read_scores(run())
    assert result["ids"].tolist() == sorted(valid["pool1"]) and np.isfinite(result["scores"]).all()


def test_cli_score_over_a_pool_smaller_than_a_batch(shards, tmp_path):
    from lightning_chips.cli import main

    root, valid = shards
    config = tmp_path / "score.yaml"
    config.write_text(
        "model:\n  class_path: lightning_chips.OpenCLIPModule\n"
        f"  init_args:\n    model_config: {json.dumps(TINY_VIT)}\n"
        f"scorer: chips\npool: {root / 'pool3'}\ntarget: {root / 'target1'}\noutput: {tmp_path / 'out'}\n"
        "num_workers: 0\nbatch_size: 256\ntrainer:\n  accelerator: cpu\n  enable_progress_bar: false\n"
    )
    main(["score", "--config", str(config), "--seed_everything", "0"])
    result = read_scores(tmp_path / "out")
    assert result["ids"].tolist() == sorted(valid["pool3"]) and np.isfinite(result["scores"]).all()


# --------------------------------------------------------------------------------------------------------------
# 4. NaN / inf features in prepare
# --------------------------------------------------------------------------------------------------------------
READS = {  # what each registered scorer's prepare reads: target, pool sample
    "chain": ("target", "pool"),
    "chips": ("target", "pool"),
    "clip_powered": ("pool",),
    "clipcov": ("pool",),
    "dot": ("target", "pool"),
    "intersect": ("target", "pool"),
    "negclip": ("pool",),
    "normsim": ("target",),
    "tracin": ("target", "pool"),
    "trak": ("target", "pool"),
}
CASES = [(name, where, value) for name, reads in sorted(READS.items()) for where in reads
         for value in (float("nan"), float("inf"))]  # fmt: skip


@pytest.mark.parametrize("name, where, value", CASES)
def test_non_finite_features_in_prepare_are_an_error_naming_the_round_and_ids(clip, name, where, value):
    endpoint, pool, target, encode = clip
    row = 4 if where == "pool" else 2
    bad_target = _with(target, row, "image", value) if where == "target" else target
    bad_pool = _with(pool, row, "text", value) if where == "pool" else pool
    bad_id = int((pool if where == "pool" else target).ids[row])
    what = "pool-sample" if where == "pool" else "target"
    with pytest.raises(FloatingPointError, match=rf"{what} pairs have NaN or inf .*round 3, first ids \[{bad_id}\]"):
        _prepare(_scorer(name), endpoint, bad_target, bad_pool, encode, round_=3)


def test_a_diverged_end_point_is_an_error_naming_it(clip):
    endpoint, pool, target, encode = clip
    diverged = copy.copy(endpoint)
    diverged.logit_scale = torch.tensor(float("nan"))
    for name in ("chips", "negclip", "normsim"):
        with pytest.raises(FloatingPointError, match=r"end point holds NaN or inf in logit_scale \(round 2\)"):
            _prepare(_scorer(name), diverged, target, pool, encode, round_=2)


def test_offline_score_with_a_diverged_model_names_the_first_ids_and_writes_no_scores(shards, tmp_path):
    """NaN image features (a diverged image tower): the target (CHIPS) or the pool sample (negCLIPLoss) is named
    in prepare; no scores file is written."""
    root, valid = shards
    for name, what, ids in (("chips", "target", [0]), ("negclip", "pool-sample", None)):
        module = _module()
        with torch.no_grad():
            module.model.visual.conv1.weight.fill_(float("nan"))
        out = tmp_path / name
        with pytest.raises(FloatingPointError, match=rf"{what} pairs have NaN or inf image features") as info:
            score_pool(module, _offline(name), str(root / "pool12"), str(out), target=str(root / "target1"),
                       num_workers=0, trainer=_trainer())  # fmt: skip
        named = json.loads(str(info.value).split("first ids ")[1].split(")")[0])
        assert set(named) <= set(ids or valid["pool12"]) and named
        assert not (out / "scores.npz").exists()


def test_test_file_covers_every_registered_scorer():
    """A scorer registered later must be placed in READS (or be Random/CLIPScore, which read no features in
    prepare) so that its non-finite-feature behaviour is tested."""
    assert set(SCORERS) - set(READS) == {"clipscore", "random"}
