"""ZeroShotEvaluation on the built-in data: chance for an untrained CLIP, above chance once trained."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_chips import (
    BuiltinZeroShotTask,
    OpenCLIPModule,
    RetrievalTask,
    TwoDomainDataModule,
    TwoDomainPairs,
    ZeroShotEvaluation,
)

from .conftest import TINY_VIT

N_EVAL = 500
CHANCE = 0.1
SIGMA = math.sqrt(CHANCE * (1 - CHANCE) / N_EVAL)


def _evaluation() -> ZeroShotEvaluation:
    return ZeroShotEvaluation(
        {
            "target": BuiltinZeroShotTask("target", N_EVAL),
            "general": BuiltinZeroShotTask("general", N_EVAL),
            "pairs": RetrievalTask(TwoDomainPairs(200, target_fraction=0.5, split="test", seed=1)),
        },
        groups={"classification": ["target", "general"]},
        batch_size=250,
    )


def test_untrained_model_is_at_chance():
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT))
    results = _evaluation().evaluate(module)
    for domain in ("target", "general"):
        assert abs(results[f"zeroshot/{domain}/acc1"] - CHANCE) < 4 * SIGMA, results
    mean = (results["zeroshot/target/acc1"] + results["zeroshot/general/acc1"]) / 2
    assert results["zeroshot/classification/acc1"] == pytest.approx(mean)
    assert results["zeroshot/pairs/image_retrieval_recall@1"] < 0.05  # 200 candidates: chance is 0.005


def test_trained_model_is_above_chance_on_the_target_domain(tmp_path):
    pl.seed_everything(0)
    module = OpenCLIPModule(model_config=copy.deepcopy(TINY_VIT), lr=2e-3, warmup_steps=10)
    data = TwoDomainDataModule(num_train=3200, num_val=64, target_fraction=0.5, batch_size=64)
    evaluation = _evaluation()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=3, callbacks=[evaluation], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    results = evaluation.last
    assert results["zeroshot/target/acc1"] > CHANCE + 5 * SIGMA, results
    assert results["zeroshot/pairs/image_retrieval_recall@10"] > 0.2, results
    # The callback logged what it computed.
    assert trainer.callback_metrics["zeroshot/target/acc1"] == pytest.approx(results["zeroshot/target/acc1"])
    assert module.training  # evaluation restored train mode


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="at least one task"):
        ZeroShotEvaluation({})
    with pytest.raises(ValueError, match="unknown tasks"):
        ZeroShotEvaluation({"t": BuiltinZeroShotTask("target", 10)}, groups={"g": ["x"]})
    with pytest.raises(ValueError, match="domain"):
        BuiltinZeroShotTask("medical")
    with pytest.raises(ValueError, match="ZeroShotTask or a RetrievalTask"):
        ZeroShotEvaluation({"t": torch.zeros(3)})
