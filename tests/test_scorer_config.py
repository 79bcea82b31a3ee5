"""Every scorer has one typed, serialisable configuration: its ``arguments`` dataclass holds every constructor
parameter, and ``repr(scorer)`` (which names an offline ``score`` run) and ``scorer.config()`` change with each of
them, so a re-run with other settings is never mistaken for the earlier run."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_chips import OpenCLIPModule
from lightning_chips.functional.chips import ChipsArguments
from lightning_chips.offline import read_scores, score_pool
from lightning_chips.scoring import (
    CHIPS,
    SCORERS,
    Chain,
    ClipCov,
    ClipPowered,
    CLIPScore,
    Intersect,
    NegCLIPLoss,
    NormSim,
    Random,
    Scorer,
    TracIn,
    build_scorer,
)

from .conftest import TINY_VIT
from .shards import write_pool

# Constructor keywords a scorer needs besides its defaults (so that every alternative below is valid on its own).
BASE: dict[str, dict] = {
    "chain": {"first": CLIPScore(), "second": NormSim()},
    "intersect": {"scorers": [CLIPScore(), NormSim()], "fractions": [0.5, 1.0]},
    "clip_powered": {"classnames": ["circle", "cell"]},  # labels then defaults to "labels"
}
_INFLUENCE = {"sketch_dim": 64, "sketch": "rademacher", "damping": 0.1, "bank_size": 16, "train_samples": 32, "seed": 1,
              "dtype": "float32"}  # fmt: skip
# For every constructor parameter of every registered scorer, another valid value than its default (or BASE's).
ALTERNATIVES: dict[str, dict[str, object]] = {
    "chips": {
        "alpha": 0.6, "beta": 0.25, "sketch_dim": 256, "sketch": "rademacher", "sketch_layout": "kronecker",
        "solver": "kernel", "damping": 0.01, "relative_damping": 1e-2, "bank_size": 512, "curvature_samples": 4096,
        "negatives_per_sample": 2, "components": ("alignment",), "plausibility_power": 5.0, "noise_adaptive": False,
        "noise_range": (0.1, 0.3), "reference_steps": 10,
        "reference_lr": 1e-2, "seed": 1, "dtype": "float32",
    },
    "random": {"seed": 1, "fixed": True},
    "clipscore": {},
    "negclip": {"temperature": 0.05, "batch_size": 1024, "repeats": 3, "seed": 1},
    "normsim": {"p": 2.0},
    "clipcov": {"classes": "labels", "num_clusters": 5, "classnames": ["circle"], "templates": ["{}"], "seed": 1},
    "clip_powered": {
        "classnames": ["circle"], "templates": ["{}"], "labels": "zeroshot", "num_clusters": 5,
        "train_adapters": False, "adapter_epochs": 1, "neighbours": 8, "diversity_weight": 0.2, "seed": 1,
    },
    "dot": _INFLUENCE,
    "trak": _INFLUENCE,
    "tracin": _INFLUENCE,
    "chain": {"first": NegCLIPLoss(), "second": NormSim(p=2.0), "keep_fraction": 0.5},
    "intersect": {"scorers": [CLIPScore(), NormSim(p=2.0)], "fractions": [0.5, 0.5], "rank_by": 0},
}  # fmt: skip


def _parameters(cls: type[Scorer]) -> list[inspect.Parameter]:
    return list(inspect.signature(cls).parameters.values())


def _fields(scorer: Scorer) -> list[str]:
    return [field.name for field in dataclasses.fields(scorer.arguments)]


def _roundtrip(config: dict) -> dict:
    return json.loads(json.dumps(config, allow_nan=False))  # strict JSON: no NaN or Infinity literals


def test_every_registered_scorer_has_a_table_entry():
    assert set(ALTERNATIVES) == set(SCORERS)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_constructor_parameter_is_an_arguments_field_and_changes_repr_and_config(name):
    cls, base = SCORERS[name], BASE.get(name, {})
    parameters = _parameters(cls)
    assert all(p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in parameters), "name every parameter"
    scorer = cls(**base)
    assert dataclasses.is_dataclass(scorer.arguments) and scorer.arguments.__dataclass_params__.frozen
    fields = _fields(scorer)
    assert {p.name for p in parameters} <= set(fields)
    assert set(ALTERNATIVES[name]) == {p.name for p in parameters}, "give every parameter an alternative value"
    config = scorer.config()
    assert list(config["arguments"]) == fields  # every field, in field order
    assert repr(scorer).startswith(f"{cls.__name__}(")
    for field in fields:
        assert f"{field}=" in repr(scorer), field
        assert getattr(scorer, field) is getattr(scorer.arguments, field)  # read as an attribute
    for parameter, value in ALTERNATIVES[name].items():
        changed = cls(**{**base, parameter: value})
        assert repr(changed) != repr(scorer), parameter
        assert changed.config() != config and _roundtrip(changed.config()) != _roundtrip(config), parameter
        assert json.dumps(changed.config()) != json.dumps(config), parameter


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_config_is_json_and_names_the_scorer(name):
    cls, base = SCORERS[name], BASE.get(name, {})
    for scorer in (cls(**base), cls(**{**base, **ALTERNATIVES[name]})):
        config = scorer.config()
        assert _roundtrip(config) == config
        assert config["name"] == name and build_scorer(name, **base).config()["name"] == name
        module, _, qualname = config["class"].rpartition(".")
        assert getattr(importlib.import_module(module), qualname) is cls


def test_repr_lists_every_field_in_order_and_configs_nest():
    assert repr(CHIPS(bank_size=8)) == (
        "CHIPS(alpha='auto', beta=0.5, sketch_dim=512, sketch='gaussian', sketch_layout='khatri_rao', solver='sketch', "
        "damping=None, relative_damping=0.001, bank_size=8, curvature_samples=8192, negatives_per_sample=4, "
        "components=('alignment', 'learnability', 'relevance', 'plausibility'), plausibility_power=10.0, "
        "noise_adaptive=True, noise_range=(0.1, 0.2), reference_steps=50, reference_lr=0.001, seed=0, "
        "dtype='float64', exact_when_small=True)"
    )
    assert isinstance(CHIPS().arguments, ChipsArguments)
    assert repr(NormSim()) == "NormSim(p=inf)" and NormSim().config()["arguments"] == {"p": "inf"}
    assert repr(NegCLIPLoss(seed=3)) == "NegCLIPLoss(temperature=0.01, batch_size=32768, repeats=10, seed=3)"
    chain = Chain(CLIPScore(), CHIPS(bank_size=8), keep_fraction=0.5)
    assert repr(chain) == f"Chain(first=CLIPScore(), second={CHIPS(bank_size=8)!r}, keep_fraction=0.5)"
    assert chain.config()["arguments"]["second"] == CHIPS(bank_size=8).config()
    assert repr(Chain(CLIPScore(), CHIPS(bank_size=16), keep_fraction=0.5)) != repr(chain)  # a part's setting
    intersect = Intersect([CLIPScore(), TracIn(seed=2)], [0.5, 1.0])
    assert intersect.config()["arguments"]["scorers"][1] == TracIn(seed=2).config()
    assert intersect.rank_by == 1 and intersect.fractions == (0.5, 1.0)
    assert repr(Intersect([CLIPScore(), TracIn(seed=2)], [0.5, 1.0], rank_by=-1)) == repr(intersect)  # same settings
    # tuples for sequences, whatever sequence was given
    assert ClipCov(classnames=["a"]).classnames == ("a",) and CHIPS(components=["alignment"]).components == (
        "alignment",
    )


def test_settings_are_frozen_and_read_as_attributes():
    scorer = CHIPS(bank_size=8, seed=4)
    assert scorer.bank_size == 8 and scorer.seed == 4 and scorer.alpha == "auto"
    with pytest.raises(AttributeError, match="build a new scorer"):
        scorer.bank_size = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        scorer.arguments.bank_size = 16
    with pytest.raises(AttributeError, match="no attribute 'no_such_setting'"):
        _ = scorer.no_such_setting
    assert copy.deepcopy(scorer).config() == scorer.config()
    clone = copy.deepcopy(Chain(CLIPScore(), TracIn(bank_size=8)))
    assert clone.second.bank_size == 8


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Random(seed=1.5), "`seed` must be an integer"),
        (lambda: Random(fixed="yes"), "`fixed` must be True or False"),
        (lambda: NegCLIPLoss(temperature=0), "`temperature` must be a finite number > 0"),
        (lambda: NegCLIPLoss(batch_size=1), "`batch_size` must be an integer >= 2"),
        (lambda: NormSim(p=3), "p = 2 or p = inf"),
        (lambda: ClipCov(classes="zeroshot"), "needs `classnames`"),
        (lambda: ClipCov(classnames="cat"), "`classnames` must be a list of strings"),
        (lambda: ClipPowered(neighbours=0), "`neighbours` must be an integer >= 1"),
        (lambda: ClipPowered(diversity_weight=float("nan")), "`diversity_weight` must be a finite number"),
        (lambda: build_scorer("trak", bank_size=0), "`bank_size` must be an integer >= 1"),
        (lambda: build_scorer("dot", dtype="float16"), "`dtype` must be one of 'float32', 'float64'"),
        (lambda: TracIn(sketch_dim=2), "`sketch_dim` must be an integer >= 3 or None"),
        (lambda: Chain(CLIPScore(), NormSim(), keep_fraction=0), r"`keep_fraction` must be in \(0, 1\]"),
        (lambda: Intersect([CLIPScore(), NormSim()], [0.5, 0.5], rank_by=2), "`rank_by` must index"),
    ],
)
def test_bad_settings_fail_when_built_saying_what_to_pass(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_a_scorer_built_from_its_arguments_equals_the_one_built_from_keywords(name):
    cls, base = SCORERS[name], BASE.get(name, {})
    for scorer in (cls(**base), cls(**{**base, **ALTERNATIVES[name]})):
        built = cls.from_arguments(scorer.arguments)
        assert type(built) is cls and built.arguments == scorer.arguments and repr(built) == repr(scorer)


def test_chips_from_chips_arguments_equals_chips_from_keywords():
    keywords = {"alpha": 0.6, "bank_size": 8, "components": "plausibility", "noise_range": [0.1, 0.3], "seed": 2}
    assert CHIPS.from_arguments(ChipsArguments(**keywords)).config() == CHIPS(**keywords).config()
    with pytest.raises(ValueError, match=r"exact_when_small=False \(it sets True\)"):
        CHIPS.from_arguments(ChipsArguments(exact_when_small=False))
    with pytest.raises(TypeError, match="settings dataclass, got InfluenceArguments"):
        CHIPS.from_arguments(TracIn().arguments)
    with pytest.raises(TypeError, match="settings dataclass, got dict"):
        CHIPS.from_arguments({"alpha": 0.6})


def test_a_scorer_without_arguments_still_works_and_one_with_them_is_told_apart():
    class Plain(Scorer):
        requires_target = False

        def prepare(self, endpoint, target, pool_sample, context=None) -> None:
            self.use_context(context)

        def score(self, batch):
            return torch.zeros(len(batch))

    assert repr(Plain()) == "Plain()" and Plain().config()["arguments"] == {}

    @dataclass(frozen=True)
    class TemperatureArguments:
        temperature: float = 0.1

    class Tempered(Plain):
        def __init__(self, *, temperature: float = 0.1) -> None:
            self.arguments = TemperatureArguments(temperature)

    assert repr(Tempered()) == "Tempered(temperature=0.1)" and Tempered(temperature=0.2).temperature == 0.2
    assert Tempered().config()["class"].endswith("Tempered")
    bad = Plain()
    bad.arguments = {"temperature": 0.1}  # not a dataclass
    with pytest.raises(TypeError, match="dataclass instance"):
        bad.config()


# --------------------------------------------------------------------------------------------------------------
# end to end: an offline `score` re-run with other settings refuses the output of the first
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    write_pool(root / "pool", num_pairs=24, per_shard=8)
    write_pool(root / "target", num_pairs=8, per_shard=8, uid_offset=0, target_fraction=1.0, split="val",
               prefix="target")  # fmt: skip
    return root


def _score(root, output, bank_size: int):
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    scorer = CHIPS(sketch_dim=32, bank_size=bank_size, curvature_samples=16)
    return read_scores(score_pool(module, scorer, str(root / "pool"), str(output), target=str(root / "target"),
                                  batch_size=8, num_workers=0, trainer=trainer))  # fmt: skip


@pytest.mark.slow
def test_score_rerun_with_another_bank_size_is_refused_and_the_same_settings_resume(tiny_shards, tmp_path):
    """Before every setting was in the repr, the second run below found every shard done under the same run name
    and returned the first run's scores (bank_size 8) as those of bank_size 12."""
    out = tmp_path / "out"
    first = _score(tiny_shards, out, bank_size=8)
    assert len(first["ids"]) == 24
    other = _score(tiny_shards, tmp_path / "other", bank_size=12)  # the scores the changed setting gives
    np.testing.assert_array_equal(other["ids"], first["ids"])
    assert not np.allclose(other["scores"], first["scores"])  # so reusing the first run's scores would be wrong
    with pytest.raises(ValueError, match="holds scores of another run"):
        _score(tiny_shards, out, bank_size=12)
    again = _score(tiny_shards, out, bank_size=8)  # the same settings resume (every shard is done)
    np.testing.assert_array_equal(again["ids"], first["ids"])
    np.testing.assert_array_equal(again["scores"], first["scores"])
