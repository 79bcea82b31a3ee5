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

One module: the command line's parsers and dispatch, every subcommand's options in one place. A user error (an
unknown or misspelled key, an invalid value, a missing file or checkpoint) is one line that names the key, value or
path, with a "did you mean" where one is close, and a hint; exit code 2 (:mod:`lightning_chips.cli_errors` writes
that line). ``--verbose`` shows the parser's full message or the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import sys
from collections.abc import Callable
from typing import Any

from lightning_chips.cli_errors import (
    EXIT_USER_ERROR,  # noqa: F401 (the exit codes stand together here)
    UserError,
    ckpt_path_problem,
    config_files,
    did_you_mean,
    explain_exception,
    explain_parse_error,
    fail,
    strict_failures,
    user_error_types,
)
from lightning_chips.help_cache import cached_help, help_key, store_help

__all__ = ["build_cli", "main", "offline_parser", "run_offline"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
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

Run `lightning-chips SUBCOMMAND --help` for its examples and options. Every subcommand also takes:
  --verbose  show the parser's full message or the traceback of an error (by default a user error is one line
             and a hint, exit code 2)
  --strict   (score) exit with code 3 when samples were skipped or shards could not be read
"""

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


_CLI_SETTINGS: dict[str, Any] = {
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "save_config_kwargs": {"overwrite": True},
}
"""How both entry points (:func:`build_cli` and the command line) build the LightningCLI."""


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
        **_CLI_SETTINGS,
        args=args,
        run=run,
    )


_CLASSES = """model, data and callbacks are given by class_path (lightning_chips.models.OpenCLIPModule, TwoTowerCLIP;
lightning_chips.data.ScoredSubsetDataModule, WebDatasetDataModule; lightning_chips.DataSelectionCallback,
ZeroShotEvaluation; or your own), with their arguments under init_args; `--model.help CLASS` lists a class's.
A mistake in the input is one line and a hint (exit code 2); add --verbose for the parser's full message or the
traceback."""

_EXAMPLES = {
    "fit": """Train a model from a YAML config, e.g. with DataSelectionCallback re-selecting its data.

examples:
  lightning-chips fit --config examples/quickstart.yaml
  lightning-chips fit --config examples/quickstart.yaml --trainer.max_epochs 2 --model.init_args.lr 1e-3
  lightning-chips fit --config examples/quickstart.yaml --print_config        # the resolved config, then exit
  lightning-chips fit --config run.yaml --ckpt_path runs/run/checkpoints/last.ckpt   # resume
""",
    "validate": """One evaluation epoch over the validation set.

examples:
  lightning-chips validate --config examples/quickstart.yaml --ckpt_path runs/run/checkpoints/last.ckpt
  lightning-chips validate --config examples/quickstart.yaml --trainer.limit_val_batches 10
""",
    "test": """One evaluation epoch over the test set.

examples:
  lightning-chips test --config run.yaml --ckpt_path runs/run/checkpoints/last.ckpt
""",
    "predict": """Run the model's predict step over the predict set.

examples:
  lightning-chips predict --config run.yaml --ckpt_path runs/run/checkpoints/last.ckpt
""",
}


def _description(command: str) -> str:
    return f"{_EXAMPLES[command]}\n{_CLASSES}\n"


@functools.cache
def _help_formatter() -> type:
    """jsonargparse's help formatter, except that a description keeps its lines (the examples block)."""
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return HelpFormatter


def _run_lightning(command: str | None, *, verbose: bool, components: bool = True) -> Any:
    """Run ``fit`` / ``validate`` / ``test`` / ``predict`` from ``sys.argv`` (never ``args=``, which makes
    LightningCLI warn that it is meant for Python). Only ``command``'s parser is built (all four for ``None``).
    Without ``verbose`` a user error in the parsing, in building the classes or in the run raises
    :class:`UserError` with one line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_chips.engine import TooManySkippedError
    from lightning_chips.io import OutputLockedError

    if components:
        _import_components()
    setup_types = (*user_error_types(), MisconfigurationException)
    run_types = (OSError, ValueError, OutputLockedError, TooManySkippedError, MisconfigurationException)
    commands = (command,) if command else LIGHTNING_COMMANDS

    class CommandLineCLI(_cli_class()):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {name: skip for name, skip in LightningCLI.subcommands().items() if name in commands}

        def parse_arguments(self, parser: Any, args: Any) -> None:
            if verbose:
                return super().parse_arguments(parser, args)
            try:
                super().parse_arguments(parser, args)
            except argparse.ArgumentError as exc:
                sub = self._subcommand_parsers.get(command or "")
                raise UserError(explain_parse_error(str(exc), sub or parser, config_files(sys.argv))) from exc
            subcommand = self.config.get("subcommand")
            problem = ckpt_path_problem(self.config[subcommand].get("ckpt_path")) if subcommand else None
            if problem:
                raise UserError(problem)

        def instantiate_classes(self) -> None:
            if verbose:
                return super().instantiate_classes()
            try:
                super().instantiate_classes()
            except Exception as exc:
                root, message = explain_exception(exc, owner=True)
                if not isinstance(root, setup_types):
                    raise
                raise UserError(message) from exc

        def _run_subcommand(self, subcommand: str) -> None:
            if verbose:
                return super()._run_subcommand(subcommand)
            try:
                super()._run_subcommand(subcommand)
            except run_types as exc:
                raise UserError(explain_exception(exc)[1]) from exc

    parser_kwargs: dict[str, Any] = {"prog": "lightning-chips", "formatter_class": _help_formatter()}
    parser_kwargs["exit_on_error"] = verbose  # else the error is raised, for one line
    for name in commands:
        usage = f"lightning-chips {name} [-h] [-c CONFIG] [--print_config[=flags]] [--KEY VALUE ...] [--verbose]"
        parser_kwargs[name] = {"description": _description(name), "usage": usage}
    return CommandLineCLI(
        LightningModule,
        LightningDataModule,
        **_CLI_SETTINGS,
        parser_kwargs=parser_kwargs,
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
            names = ", ".join(sorted(SCORERS))
            raise ValueError(f"Unknown scorer {value!r}: use a registered name ({names}) or a class path such as "
                             f"my_package.MyScorer{did_you_mean(value.lower(), SCORERS) or '.'}")  # fmt: skip
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


_OFFLINE_EXAMPLES = {
    "score": """Score every pair of a WebDataset pool (DDP over devices and nodes through --trainer.*); writes
OUTPUT/scores.npz, scores-rank{r}.npz and manifest.json; re-running resumes.

examples:
  lightning-chips score --pool 'pool/{000000..000999}.tar' --target target/ --output scores/chips \\
      --model OpenCLIPModule --model.model_name ViT-B-16 --model.pretrained vit_b16.pt --scorer chips
  lightning-chips score --config score.yaml --trainer.devices 8 --trainer.strategy ddp   # on 8 GPUs

A mistake in the input is one line and a hint (exit code 2); add --verbose for the full error.
""",
    "select": """The top --fraction / --count of a scores file as sorted uids (.npy); --reshard copies the selected
samples into new shards.

examples:
  lightning-chips select --scores scores/chips --fraction 0.3 --output subset.npy
  lightning-chips select --scores scores/chips --count 100000 --output subset.npy --reshard 'subset/%06d.tar'

A mistake in the input is one line and a hint (exit code 2); add --verbose for the full error.
""",
    "report": """One self-contained HTML page (no network requests) over the selection rounds of a run: settings,
score distributions, round-to-round overlap, group composition, galleries and problems.

examples:
  lightning-chips report lightning_logs/version_0
  lightning-chips report scores/chips --fraction 0.3 --out chips.html

A mistake in the input is one line and a hint (exit code 2); add --verbose for the full error.
""",
}


def _report_parser() -> Any:
    """The parser of ``lightning-chips report`` (no Lightning import: the report reads files only)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lightning-chips report",
        description=_OFFLINE_EXAMPLES["report"],
        formatter_class=_help_formatter(),
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

    if command == "score":
        from lightning.pytorch import LightningModule, Trainer

        from lightning_chips import offline
        from lightning_chips.scoring import Scorer

        _import_components()
        parser = ArgumentParser(
            prog="lightning-chips score",
            usage="lightning-chips score --pool SHARDS --output DIR --model MODEL --scorer SCORER [--target TARGET] "
            "[--KEY VALUE ...] [--strict] [--verbose]",
            description=_OFFLINE_EXAMPLES["score"],
            formatter_class=_help_formatter(),
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
        from lightning_chips import reshard

        parser = ArgumentParser(
            prog="lightning-chips select",
            description=_OFFLINE_EXAMPLES["select"],
            formatter_class=_help_formatter(),
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
    return _run_offline(offline_parser(command), command, args)


def _run_offline(parser: Any, command: str, args: list[str], *, one_line: bool = False) -> Any:
    """:func:`run_offline` with its ``parser``; with ``one_line``, a user error in building the classes raises
    :class:`UserError` naming the class that refused its arguments."""
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
    try:
        # jsonargparse >= 4.49 names it `instantiate` (the old name warns); older ones have only `instantiate_classes`
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        init = instantiate(cfg)
    except user_error_types() as exc:
        root, message = explain_exception(exc, owner=True)
        if not one_line or not isinstance(root, user_error_types()):
            raise
        raise UserError(message) from exc
    kwargs = {k: v for k, v in vars(init).items() if k != "config" and not k.startswith("__")}
    if command == "score":
        return offline.score_pool(**kwargs)
    return reshard.select_subset(**kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-chips`` console script and of ``python -m lightning_chips``.

    A user error (an unknown or misspelled key or option, an invalid value, a missing file or checkpoint; see
    :func:`~lightning_chips.cli_errors.user_error_types`) is one line on stderr and a hint, exit code 2;
    ``--verbose`` shows the parser's full message or the traceback instead. ``score --strict`` exits with code 3
    when the run skipped samples or met unreadable shards (after writing its outputs).
    """
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    command, rest = argv[0], argv[1:]
    hint = f"run `lightning-chips {command} --help` for the examples and options, or add --verbose for the full error"
    if command not in (*LIGHTNING_COMMANDS, *OFFLINE_COMMANDS) and not command.startswith("-"):
        known = (*LIGHTNING_COMMANDS, *OFFLINE_COMMANDS)
        fail(None, f"unknown subcommand {command!r}{did_you_mean(command, known)}",
             f"one of {', '.join(known)}; run `lightning-chips --help` for what each does")  # fmt: skip
    if command in (*LIGHTNING_COMMANDS, *OFFLINE_COMMANDS) and rest in (["-h"], ["--help"]):  # cached: help_cache.py
        _print_help(command, lambda: _dispatch(command, rest, argv, verbose=verbose, hint=hint))
        return
    _dispatch(command, rest, argv, verbose=verbose, hint=hint)


def _print_help(command: str, build: Callable[[], None]) -> None:
    """Print ``command``'s help page: the stored one, else the one ``build`` prints (stored for next time)."""
    key = help_key(command)
    page = cached_help(key)
    if page is None:
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                build()
        except SystemExit as exc:
            if exc.code not in (0, None):
                sys.stdout.write(buffer.getvalue())
                raise
        page = buffer.getvalue()
        store_help(key, page)
    sys.stdout.write(page)


def _dispatch(command: str, rest: list[str], argv: list[str], *, verbose: bool, hint: str) -> None:
    """Run a subcommand (or LightningCLI's top-level options when ``command`` starts with "-")."""
    if command not in OFFLINE_COMMANDS:
        command_: str | None = command
        if command.startswith("-"):  # options before the subcommand (LightningCLI's top-level --config)
            command_, rest = None, argv
            hint = "run `lightning-chips --help` for the subcommands, or add --verbose for the full error"
        saved = sys.argv
        sys.argv = [saved[0] if saved else "lightning-chips", *([command_] if command_ else []), *rest]
        try:
            _run_lightning(command_, verbose=verbose, components=rest not in (["-h"], ["--help"]))
        except UserError as exc:
            fail(command_, str(exc), hint)
        finally:
            sys.argv = saved
        return
    strict = "--strict" in rest
    rest = [a for a in rest if a != "--strict"]
    if strict and command != "score":
        rest.append("--strict")  # let the parser name the unknown option
    parser = offline_parser(command)
    parser.exit_on_error = verbose  # else the error is raised, for one line
    try:
        result = _run_offline(parser, command, rest, one_line=not verbose)
    except argparse.ArgumentError as exc:
        fail(command, explain_parse_error(str(exc), parser, config_files(rest)), hint)
    except UserError as exc:
        fail(command, str(exc), hint)
    except user_error_types() as exc:
        root, message = explain_exception(exc)
        if verbose or not isinstance(root, user_error_types()):  # a bug that jsonargparse wrapped keeps its traceback
            raise
        fail(command, message, hint)
    if strict:
        failed = strict_failures(result)
        if failed:
            print(f"lightning-chips {command}: --strict: {failed} (see manifest.json)", file=sys.stderr)
            raise SystemExit(EXIT_STRICT)
