"""The `lightning-chips` command: LightningCLI parses the quickstart YAML and runs fit/validate/test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_chips.cli import build_cli, main
from lightning_chips.data import TwoDomainDataModule
from lightning_chips.models import OpenCLIPModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def test_quickstart_yaml_instantiates_model_data_and_trainer():
    cli = build_cli(["--config", str(QUICKSTART)], run=False)
    assert isinstance(cli.model, OpenCLIPModule) and isinstance(cli.datamodule, TwoDomainDataModule)
    assert cli.model.context_length == 16 and cli.model.image_size == 32
    assert cli.trainer.max_epochs == 3
    assert cli.datamodule.hparams.noise_fraction == 0.1


def test_print_config_round_trips(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--model.init_args.lr", "0.01", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_chips.models.OpenCLIPModule"
    assert printed["model"]["init_args"]["lr"] == 0.01
    assert printed["model"]["init_args"]["model_config"]["embed_dim"] == 32
    assert printed["data"]["init_args"]["num_train"] == 6400


def test_fit_from_the_command_line_prints_the_final_validation_loss(tmp_path):
    """The console entry point as a user runs it (`python -m lightning_chips` is the same program)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_chips",
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "4",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.init_args.num_train",
            "256",
            "--data.init_args.num_val",
            "128",
            "--data.init_args.num_workers",
            "0",
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
