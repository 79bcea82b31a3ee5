"""The ``lightning-chips`` command line: LightningCLI for ``fit`` / ``validate`` / ``test`` / ``predict``.

Model and data are given by ``class_path`` (subclass mode), so any LightningModule and LightningDataModule
work from YAML::

    lightning-chips fit --config examples/quickstart.yaml
    lightning-chips fit --config examples/quickstart.yaml --trainer.max_epochs 2 --model.init_args.lr 1e-3
    lightning-chips fit --config examples/quickstart.yaml --print_config
"""

from __future__ import annotations

import math

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["LightningChipsCLI", "build_cli", "main"]


class LightningChipsCLI(LightningCLI):
    """LightningCLI with lightning-chips defaults: subclass mode for model and data, overwrite the saved config,
    and a one-line summary of the final metrics after ``fit``."""

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")

    def _print_summary(self, stage: str) -> None:
        metrics = {
            name: float(value)
            for name, value in self.trainer.callback_metrics.items()
            if getattr(value, "numel", lambda: 1)() == 1
        }
        shown = {name: value for name, value in metrics.items() if not name.startswith("train/lr")}
        if not shown:
            return
        text = ", ".join(f"{name}={value:.4f}" for name, value in sorted(shown.items()) if math.isfinite(value))
        rank_zero_info(f"[lightning-chips] {stage} finished after {self.trainer.global_step} steps: {text}")


def build_cli(args: list[str] | None = None, *, run: bool = True) -> LightningChipsCLI:
    """Parse ``args`` (default: the command line) and, with ``run=True``, execute the subcommand.

    With ``run=False`` no subcommand is expected and the trainer, model and data are only instantiated.
    """
    return LightningChipsCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-chips`` console script and of ``python -m lightning_chips``."""
    build_cli(args)
