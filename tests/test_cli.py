"""The `lightning-chips` command: LightningCLI parses the quickstart YAML and runs fit/validate/test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_chips import DataSelectionCallback, ScoredSubsetDataModule, TwoDomainPairs
from lightning_chips.cli import build_cli, main
from lightning_chips.models import OpenCLIPModule
from lightning_chips.scoring import CHIPS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def test_quickstart_yaml_instantiates_model_data_callback_and_trainer():
    cli = build_cli(["--config", str(QUICKSTART)], run=False)
    assert isinstance(cli.model, OpenCLIPModule) and isinstance(cli.datamodule, ScoredSubsetDataModule)
    assert cli.model.context_length == 16 and cli.model.image_size == 32
    pool, target = cli.datamodule.pool, cli.datamodule.target
    assert isinstance(pool, TwoDomainPairs) and len(pool) == 6400 and pool.noise_fraction == 0.1
    assert isinstance(target, TwoDomainPairs) and set(target.domains.tolist()) == {1}
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, DataSelectionCallback)]
    # the recommended CHIPS(), sizes aside
    assert repr(callback.scorer) == repr(CHIPS(sketch_dim=512, bank_size=1024, curvature_samples=4096))
    assert callback.fraction == 0.3 and callback.every_n_steps == 100


def test_yaml_builds_chips_with_the_plausibility_weight(tmp_path):
    """The recommended configuration of docs/benchmarks/quality.md, written as a user writes it in YAML."""
    config = yaml.safe_load(QUICKSTART.read_text())
    (chips,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DataSelectionCallback")]
    chips["init_args"]["scorer"]["init_args"].update(
        components=["alignment", "learnability", "relevance", "plausibility"], relative_damping=0.01,
        sketch_layout="kronecker", plausibility_power=20.0, reference_steps=10,
    )  # fmt: skip
    path = tmp_path / "robust.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, DataSelectionCallback)]
    scorer = callback.scorer
    assert scorer.components == ("alignment", "learnability", "relevance", "plausibility")
    assert (scorer.relative_damping, scorer.sketch_layout, scorer.plausibility_power, scorer.reference_steps) == (
        0.01, "kronecker", 20.0, 10)  # fmt: skip


def test_print_config_round_trips(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--model.init_args.lr", "0.01", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_chips.models.OpenCLIPModule"
    assert printed["model"]["init_args"]["lr"] == 0.01
    assert printed["model"]["init_args"]["model_config"]["embed_dim"] == 32
    assert printed["data"]["init_args"]["pool"]["init_args"]["num_samples"] == 6400
    callbacks = printed["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] == "lightning_chips.DataSelectionCallback"
    assert callbacks[0]["init_args"]["scorer"]["class_path"] == "lightning_chips.scoring.CHIPS"


def test_fit_from_the_command_line_prints_the_final_validation_loss(tmp_path):
    """The console entry point as a user runs it (`python -m lightning_chips` is the same program)."""
    args = [
        "fit", "--config", str(QUICKSTART),
        "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.pool.init_args.num_samples", "256", "--data.init_args.steps_per_round", "3",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_chips",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [
        line for line in (result.stdout + result.stderr).splitlines() if "[lightning-chips] fit finished" in line
    ]
    assert len(summary) == 1 and "val/loss=" in summary[0], result.stderr[-3000:]
    rounds = [line for line in (result.stdout + result.stderr).splitlines() if "[lightning-chips] round" in line]
    # one-shot at step 0; the next is due at step 100
    assert len(rounds) == 1 and "kept 77 of 256 pool pairs" in rounds[0]
    assert (tmp_path / "config.yaml").exists()  # the run's config is saved next to it


def test_unknown_model_name_fails_before_training(capsys):
    with pytest.raises(ValueError, match="Did you mean"):
        build_cli(
            [
                "--config",
                str(QUICKSTART),
                "--model.init_args.model_config",
                "null",
                "--model.init_args.model_name",
                "ViT-B-61",
            ],
            run=False,
        )
