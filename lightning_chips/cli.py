"""The ``lightning-chips`` command line.

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI. Model and data are given by ``class_path``
(subclass mode), so any LightningModule and LightningDataModule work from YAML::

    lightning-chips fit --config examples/quickstart.yaml
    lightning-chips fit --config examples/quickstart.yaml --trainer.max_epochs 2 --model.init_args.lr 1e-3
    lightning-chips fit --config examples/quickstart.yaml --print_config

``score`` and ``select`` work offline over WebDataset shards (:mod:`lightning_chips.offline`,
:mod:`lightning_chips.reshard`)::

    lightning-chips score --pool 'pool/{000000..000999}.tar' --target target/ --output scores/chips \
        --model OpenCLIPModule --model.model_name ViT-B-16 --model.pretrained vit_b16.pt \
        --scorer chips --scorer.sketch_dim 512 --trainer.devices 8 --trainer.strategy ddp
    lightning-chips select --scores scores/chips --fraction 0.3 --output subset.npy --reshard 'subset/%06d.tar'

``report`` writes one self-contained HTML page over a run's selection rounds (:mod:`lightning_chips.report`)::

    lightning-chips report lightning_logs/version_0
    lightning-chips report scores/chips --fraction 0.3 --out chips.html
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

__all__ = ["build_cli", "main", "offline_parser", "run_offline"]

OFFLINE_COMMANDS = ("score", "select", "report")

HELP = """usage: lightning-chips [-h] {fit,validate,test,predict,score,select,report} ...

Data selection for CLIP continual pre-training, as a PyTorch Lightning plugin.

subcommands:
  fit        train from a YAML config, e.g. with DataSelectionCallback: lightning-chips fit --config CONFIG
  validate   one evaluation epoch over the validation set
  test       one evaluation epoch over the test set
  predict    run the model's predict step over the predict set
  score      score every pair of a WebDataset pool offline (DDP through --trainer.*; re-running resumes)
  select     keep the top --fraction / --count of a scores file; --reshard copies those pairs into new shards
  report     one self-contained HTML page over a run's rounds: scores, overlap, groups, galleries, problems

Run `lightning-chips SUBCOMMAND --help` for its options. score, select and report also take:
  --verbose  show the traceback of an error (by default a user error is one line and exit code 2)
  --strict   (score) exit with code 3 when samples were skipped or shards could not be read
"""

EXIT_USER_ERROR = 2
EXIT_STRICT = 3


@functools.cache
def _cli_class() -> type:
    """:class:`LightningChipsCLI`, built on first use (Lightning is imported then, not for ``--help``)."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities import rank_zero_info

    class LightningChipsCLI(LightningCLI):
        """LightningCLI with lightning-chips defaults: subclass mode for model and data, overwrite the saved
        config, and a one-line summary of the final metrics after ``fit``, ``validate`` and ``test``."""

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

    LightningChipsCLI.__module__ = __name__
    return LightningChipsCLI


def __getattr__(name: str) -> Any:
    if name == "LightningChipsCLI":
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import_components() -> None:
    """Import the modules whose classes a config names by short name (``OpenCLIPModule``, ``CHIPS``, ...):
    jsonargparse resolves a short class name among the subclasses imported so far."""
    import lightning_chips.callback  # noqa: F401
    import lightning_chips.data  # noqa: F401
    import lightning_chips.evaluation  # noqa: F401
    import lightning_chips.models  # noqa: F401
    import lightning_chips.scoring  # noqa: F401


def build_cli(args: list[str] | None = None, *, run: bool = True) -> Any:
    """Parse ``args`` (default: the command line) and, with ``run=True``, execute the subcommand; returns the
    :class:`LightningChipsCLI` (a ``LightningCLI`` with subclass mode for model and data).

    With ``run=False`` no subcommand is expected and the trainer, model and data are only instantiated.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    _import_components()
    return _cli_class()(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _scorer_names_to_class_paths(args: list[str]) -> list[str]:
    """Registry names (``--scorer chips`` on the command line, ``scorer: chips`` or ``class_path: chips`` in a
    ``--config`` file) -> class paths (``lightning_chips.scoring.chips.CHIPS``), which jsonargparse resolves."""
    import os

    import yaml

    from lightning_chips.scoring.registry import SCORERS

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.lower() in SCORERS:
            cls = SCORERS[value.lower()]
            return f"{cls.__module__}.{cls.__qualname__}"
        if isinstance(value, str) and "." not in value and not value.lstrip().startswith(("{", "[")):
            raise ValueError(f"Unknown scorer {value!r}: use a registered name ({', '.join(sorted(SCORERS))}) or a "
                             "class path such as my_package.MyScorer.")  # fmt: skip
        if isinstance(value, dict) and "class_path" in value:
            return {**value, "class_path": resolve(value["class_path"])}
        return value

    def resolve_config(value: str) -> str:
        text = open(value).read() if os.path.isfile(value) else value
        config = yaml.safe_load(text)
        if not isinstance(config, dict) or "scorer" not in config:
            return value
        return yaml.safe_dump({**config, "scorer": resolve(config["scorer"])})

    out, i = [], 0
    while i < len(args):
        arg = args[i]
        for flag, fix in (("--scorer", resolve), ("--config", resolve_config)):
            if arg == flag and i + 1 < len(args):
                out += [arg, fix(args[i + 1])]
                i += 1
                break
            if arg.startswith(flag + "="):
                out.append(flag + "=" + fix(arg.split("=", 1)[1]))
                break
        else:
            out.append(arg)
        i += 1
    return out


def _report_parser() -> Any:
    """The parser of ``lightning-chips report`` (no Lightning import: the report reads files only)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lightning-chips report",
        description="One self-contained HTML page (no network requests) over the selection rounds of a run: "
        "settings, score distributions, round-to-round overlap, group composition, galleries and problems.",
    )
    parser.add_argument("run_dir", type=str, help="A DataSelectionCallback run (round_0000.npz, ... in it or in "
                        "its selection/ folder) or a `lightning-chips score` output folder (scores.npz).")  # fmt: skip
    parser.add_argument("--out", type=str | None, default=None,
                        help="The HTML file to write (default: RUN_DIR/report.html).")  # fmt: skip
    parser.add_argument("--pool", type=str | None, default=None,
                        help="WebDataset shards to read gallery pairs from, for rounds without a gallery file "
                        "(default for a score folder: the pool its manifest.json names).")  # fmt: skip
    parser.add_argument("--selection", type=str | None, default=None,
                        help="(score folder) A .npy of selected ids, as `lightning-chips select --output` "
                        "writes.")  # fmt: skip
    parser.add_argument("--fraction", type=float | None, default=None,
                        help="(score folder) Select the top FRACTION by score (ties by id), instead of "
                        "--selection.")  # fmt: skip
    parser.add_argument("--gallery", type=int, default=8,
                        help="Pairs per gallery kind (top, bottom, entered, left); 0 leaves the galleries "
                        "out.")  # fmt: skip
    parser.add_argument("--thumbnail-size", "--thumbnail_size", type=int, default=96,
                        help="Side in pixels of the thumbnails read from --pool.")  # fmt: skip
    parser.add_argument("--uid-field", "--uid_field", type=str | None, default=None,
                        help="The id's field in each shard sample's .json (default: the manifest's, else "
                        "uid).")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="Show the traceback of an error.")
    return parser


def offline_parser(command: str) -> Any:
    """The jsonargparse parser of ``lightning-chips score``, ``select`` or ``report``."""
    if command == "report":
        return _report_parser()

    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningModule, Trainer

    from lightning_chips import offline, reshard
    from lightning_chips.scoring import Scorer

    _import_components()

    if command == "score":
        parser = ArgumentParser(
            prog="lightning-chips score",
            description="Score every pair of a WebDataset pool (DDP over devices and nodes through --trainer.*); "
            "writes OUTPUT/scores.npz, scores-rank{r}.npz and manifest.json; re-running resumes.",
        )
        parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of these options.")
        parser.add_argument("--seed_everything", type=int | None, default=0,
                            help="Seed set before the model is built (ranks must hold the same weights).")  # fmt: skip
        parser.add_subclass_arguments(LightningModule, "model", required=True, help="The CLIP LightningModule.")
        parser.add_subclass_arguments(Scorer, "scorer", required=True, help="A registry name or a class path.")
        parser.add_function_arguments(offline.score_pool, skip={"model", "scorer", "trainer", "adapter", "after_shard"})
        parser.add_class_arguments(Trainer, "trainer", help="Trainer options: devices, num_nodes, strategy, ...")
        parser.add_argument("--verbose", action="store_true", help="Show the traceback of an error.")
        parser.add_argument("--strict", action="store_true",
                            help="Exit with code 3 when samples were skipped or shards could not be read.")  # fmt: skip
        parser.set_defaults(
            {"trainer.logger": False, "trainer.enable_checkpointing": False, "trainer.enable_model_summary": False}
        )
    elif command == "select":
        parser = ArgumentParser(
            prog="lightning-chips select",
            description="The top --fraction / --count of a scores file as sorted uids (.npy); --reshard copies "
            "the selected samples into new shards.",
        )
        parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of these options.")
        parser.add_function_arguments(reshard.select_subset)
        parser.add_argument("--verbose", action="store_true", help="Show the traceback of an error.")
    else:
        raise ValueError(f"Unknown offline command {command!r}; use one of {OFFLINE_COMMANDS}.")
    return parser


def _underscored(arg: str) -> str:
    """``--group-by=x`` -> ``--group_by=x``: score and select take the dashed spelling of every option too."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{eq}{value}"


def run_offline(command: str, args: list[str]) -> Any:
    """Parse ``args`` for ``score`` / ``select`` / ``report`` and run it."""
    parser = offline_parser(command)
    if command == "report":
        from lightning_chips.report import build_report

        cfg = vars(parser.parse_args(args))
        cfg.pop("verbose", None)
        return build_report(cfg.pop("run_dir"), cfg.pop("out"), **cfg)

    from lightning_chips import offline, reshard

    args = [_underscored(arg) for arg in args]
    cfg = parser.parse_args(_scorer_names_to_class_paths(args) if command == "score" else args)
    seed = cfg.pop("seed_everything", None) if command == "score" else None
    if seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(seed, verbose=False)
    for flag in ("verbose", "strict"):  # handled by main(); listed in --help
        cfg.pop(flag, None)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k != "config" and not k.startswith("__")}
    if command == "score":
        return offline.score_pool(**kwargs)
    return reshard.select_subset(**kwargs)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """What a user's input causes (a missing shard, an empty target, a bad fraction, a damaged or locked output):
    reported as one line. Anything else is a bug and keeps its traceback."""
    from lightning_chips.engine import TooManySkippedError
    from lightning_chips.io import OutputLockedError

    return (ValueError, TypeError, OSError, LookupError, OutputLockedError, TooManySkippedError)


def _strict_failures(scores: Any) -> str | None:
    """What makes a ``score --strict`` run fail: skipped samples or unreadable shards in its manifest."""
    import json
    from pathlib import Path

    manifest = json.loads((Path(scores).parent / "manifest.json").read_text())
    problems = []
    if manifest.get("skipped"):
        problems.append(f"{manifest['skipped']} samples were skipped")
    if manifest.get("unreadable_shards"):
        problems.append(f"{len(manifest['unreadable_shards'])} shards could not be read to the end")
    return " and ".join(problems) or None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-chips`` console script and of ``python -m lightning_chips``.

    ``score``, ``select`` and ``report`` report a user error (see :func:`_user_error_types`) as one line on stderr
    and exit with code 2 (``--verbose``: the traceback); ``score --strict`` exits with code 3 when the run skipped
    samples or met unreadable shards (after writing its outputs).
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    if argv[0] not in OFFLINE_COMMANDS:
        build_cli(argv)
        return
    command, rest = argv[0], argv[1:]
    verbose, strict = "--verbose" in rest, "--strict" in rest
    rest = [a for a in rest if a not in ("--verbose", "--strict")]
    if strict and command != "score":
        rest.append("--strict")  # let the parser name the unknown option
    try:
        result = run_offline(command, rest)
    except _user_error_types() as exc:
        if verbose:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"lightning-chips {command}: error: {message}", file=sys.stderr)
        print(f"  (run `lightning-chips {command} --help` for the options, or add --verbose for the traceback)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_USER_ERROR) from None
    if strict:
        failed = _strict_failures(result)
        if failed:
            print(f"lightning-chips {command}: --strict: {failed} (see manifest.json)", file=sys.stderr)
            raise SystemExit(EXIT_STRICT)
