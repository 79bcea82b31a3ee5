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

One module: the command line, from its parsers to how it answers a mistake in its input. A user error (an unknown
or misspelled key, an invalid value, a missing file or checkpoint) is one line that names the key, value or path,
with a "did you mean" where one is close, and a hint; exit code 2. ``--verbose`` shows the parser's full message or
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

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


class _UserError(Exception):
    """A mistake in the command's input, already said in one line."""


def _run_lightning(command: str | None, *, verbose: bool, components: bool = True) -> Any:
    """Run ``fit`` / ``validate`` / ``test`` / ``predict`` from ``sys.argv`` (never ``args=``, which makes
    LightningCLI warn that it is meant for Python). Only ``command``'s parser is built (all four for ``None``).
    Without ``verbose`` a user error in the parsing, in building the classes or in the run raises
    :class:`_UserError` with one line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from lightning_chips.engine import TooManySkippedError
    from lightning_chips.io import OutputLockedError

    if components:
        _import_components()
    setup_types = (*_user_error_types(), MisconfigurationException)
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
                raise _UserError(_explain_parse_error(str(exc), sub or parser, _config_files(sys.argv))) from exc
            subcommand = self.config.get("subcommand")
            problem = _ckpt_path_problem(self.config[subcommand].get("ckpt_path")) if subcommand else None
            if problem:
                raise _UserError(problem)

        def instantiate_classes(self) -> None:
            if verbose:
                return super().instantiate_classes()
            try:
                super().instantiate_classes()
            except Exception as exc:
                root, message = _explain_exception(exc, owner=True)
                if not isinstance(root, setup_types):
                    raise
                raise _UserError(message) from exc

        def _run_subcommand(self, subcommand: str) -> None:
            if verbose:
                return super()._run_subcommand(subcommand)
            try:
                super()._run_subcommand(subcommand)
            except run_types as exc:
                raise _UserError(_explain_exception(exc)[1]) from exc

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


def _ckpt_path_problem(ckpt_path: Any) -> str | None:
    """What is wrong with ``--ckpt_path``: a local path that does not exist (``last``, ``best``, ``hpc``,
    ``registry...`` and URLs are Lightning's to resolve)."""
    if not isinstance(ckpt_path, (str, os.PathLike)):
        return None
    path = os.fspath(ckpt_path)
    if path in ("best", "last", "hpc") or path.startswith("registry") or "://" in path or os.path.exists(path):
        return None
    return (f"--ckpt_path {path!r}: no such checkpoint file (give a .ckpt file, or 'last' / 'best' for the "
            "trainer's own)")  # fmt: skip


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
                             f"my_package.MyScorer{_did_you_mean(value.lower(), SCORERS) or '.'}")  # fmt: skip
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
    :class:`_UserError` naming the class that refused its arguments."""
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
        init = parser.instantiate_classes(cfg)
    except _user_error_types() as exc:
        root, message = _explain_exception(exc, owner=True)
        if not one_line or not isinstance(root, _user_error_types()):
            raise
        raise _UserError(message) from exc
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


# ----------------------------------------------------------------------------------------------------------------
# One line for a user error: jsonargparse's nested messages and wrapped exceptions, distilled
# ----------------------------------------------------------------------------------------------------------------
_UNION = "Does not validate against any of the Union subtypes"
_WRAPPERS = (_UNION, "Problem with given class_path", "Parser key")
_NOISE = re.compile(r"Expected a path but .* either not accessible or invalid|Not a valid subclass of |"
                    r"Expected a <class 'NoneType'>$")  # fmt: skip


class _Class:
    """A class in a key's path (``Problem with given class_path``), with its index when the key holds a list."""

    def __init__(self, path: str) -> None:
        self.path, self.index = path, None


def _where(path: list) -> str:
    """``["data", _Class(..), "pool", _Class(..), "num_sample"]`` -> ``data.init_args.pool.init_args.num_sample``."""
    out = ""
    for i, part in enumerate(path):
        if isinstance(part, _Class):
            out += f"[{part.index}]" if part.index is not None else ""
            out += ".init_args" if i + 1 < len(path) else ""
        else:
            out += ("." if out else "") + part
    return out


def _did_you_mean(word: str, candidates: Any) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(set(candidates) - {word}), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _import_object(dotted: str) -> Any:
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except Exception:
        return None


def _init_parameters(class_path: str) -> list[str]:
    """The keyword names ``class_path``'s ``__init__`` takes, following ``**kwargs`` to the base classes."""
    import inspect

    cls, names = _import_object(class_path), []
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(klass):
            continue
        try:
            params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _parser_keys(parser: Any) -> tuple[list[str], list[str]]:
    """A parser's keys (``trainer.max_epochs``) and option strings (``--trainer.max_epochs``)."""
    actions = [a for a in getattr(parser, "_actions", []) if a.dest not in ("help", "config", "print_config")]
    keys = [a.dest for a in actions if a.option_strings and not a.dest.endswith(".help")]
    return keys, [o for a in actions for o in a.option_strings if o.startswith("--")]


def _subclass_names(subtypes: str, dotted: bool) -> list[str]:
    """The names of the imported subclasses of the classes in a ``Subtypes: [...]`` line."""
    found, todo = set(), [_import_object(name) for name in re.findall(r"<class '([\w.]+)'>", subtypes)]
    while todo:
        cls = todo.pop()
        if isinstance(cls, type) and cls not in found:
            found.add(cls)
            todo += cls.__subclasses__()
    return [f"{c.__module__}.{c.__qualname__}" if dotted else c.__name__ for c in found]


def _bullets(lines: list[str]) -> list[str]:
    items: list[list[str]] = []
    for line in lines:
        if line.startswith("- "):
            items.append([line[2:]])
        elif items:
            items[-1].append(line)
    return ["\n".join(item) for item in items]


def _findings(text: str, path: list, ctx: dict) -> list[tuple[int, list, str]]:
    """What a jsonargparse message says, as ``(specificity, key path, one line with \\0 for the path)``."""
    import textwrap

    lines = textwrap.dedent("\n".join(line for line in text.splitlines() if line.strip())).splitlines()
    if not lines:
        return []
    first, rest = lines[0].strip(), lines[1:]
    if match := re.match(r'Parser key "([^"]+)":\s*(.*)$', first):
        return _findings("\n".join([match[2], *rest]), [*path, match[1]], ctx)
    if match := re.match(r"Problem with given class_path '([^']+)':\s*(.*)$", first):
        return _findings("\n".join([match[2], *rest]), [*path, _Class(match[1])], ctx)
    if first.startswith("- "):
        return [f for item in _bullets(lines) for f in _findings(item, path, ctx)]
    if first.startswith(_UNION):
        return _union_findings(lines, path, ctx)
    classes = [part for part in path if isinstance(part, _Class)]
    if match := re.match(r"Option '([^']+)' is not accepted$", first):
        key, owner = match[1], classes[-1] if classes else None
        hint = _did_you_mean(key, _init_parameters(owner.path)) if owner else ""
        about = f" ({owner.path} has no parameter {key!r})" if owner else ""
        return [(5, [*path, key], f"unknown key \0{about}{hint}")]
    if match := re.match(r"(?:Subcommand '[^']+'|Group '([^']+)') does not accept option '([^']+)'", first):
        key = f"{match[1]}.{match[2]}" if match[1] else match[2]
        known = {".".join(k.split(".")[:i]) for k in ctx["keys"] for i in range(1, k.count(".") + 2)}
        parts = key.split(".")  # a misspelled group (`traner:`) is named, not the first key under it
        key = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in known), key)
        same_depth = [k for k in known if k.count(".") == key.count(".")]
        return [(5, [*path, key], f"unknown key \0{_did_you_mean(key, same_depth)}")]
    if match := re.match(r"unrecognized arguments: (.*)$", first):
        words = match[1].split()
        option = next((w for w in words if w.startswith("-")), None)
        if option is None:
            return [(5, path, f"unexpected argument {words[0]!r}" if words else first)]
        option = option.split("=", 1)[0]
        return [(5, path, f"unknown option {option!r}{_did_you_mean(option, ctx['options'])}")]
    if match := re.match(r"Expected a (.+?)\. Got value: (.*)$", " ".join(lines).strip()):
        return [(4, path, f"invalid value {match[2]!r} for \0: expected {_type_name(match[1])}")]
    if match := re.match(r"Expected a dot import path string: (.*)$", first):
        name = match[1].strip()
        names = _subclass_names(ctx.get("subtypes", ""), dotted="." in name)
        return [(3, path, f"\0: unknown class {name!r}{_did_you_mean(name, names)}")]
    if match := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", first):
        module = sys.modules.get(match[1])
        names = [*dir(module), *_submodules(module)]
        given = f" {classes[-1].path!r}" if classes else ""
        return [(4, path, f"\0: cannot import{given}: {first}{_did_you_mean(match[2], names)}")]
    if match := re.match(r"No module named '([\w.]+)'", first):
        parent, _, name = match[1].rpartition(".")
        names = _submodules(sys.modules.get(parent)) if parent else []
        return [(4, path, f"\0: {first}{_did_you_mean(name, names)}")]
    if match := re.match(r"File does not exist: (.*)$", first):
        flag = path == ["config"]
        return [(4, [], f"--config {match[1]}: no such file")] if flag else [(4, path, f"\0: no such file {match[1]}")]
    if first.startswith("Problems parsing config"):
        detail = re.sub(r'\s*in "<unicode string>", (line \d+, column \d+)', r" (\1)", " ".join(lines))
        detail = " ".join(detail.replace("Problems parsing config:", "").split()).replace(") ", "): ", 1)
        configs = ctx.get("configs") or []
        name = f"the config {configs[0]!r}" if len(configs) == 1 else "a --config file"
        return [(4, path, f"{name} is not valid YAML: {detail}")]
    if _NOISE.match(first):
        return [(0, path, first)]
    if match := re.match(r"Expected an? (.+)$", first):
        return [(1, path, _type_name(match[1]))]
    return [(4, path, "\0: " + " ".join(" ".join(lines).split()))]


def _union_findings(lines: list[str], path: list, ctx: dict) -> list[tuple[int, list, str]]:
    import ast

    text = "\n".join(lines)
    subtypes = next((line for line in lines if line.startswith("Subtypes:")), "")
    errors = text.partition("\nErrors:\n")[2].partition("\nGiven value type:")[0]
    given = text.partition("\nGiven value: ")[2]
    found = _findings(errors, path, {**ctx, "subtypes": subtypes})
    try:
        value = ast.literal_eval(given)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    for _, sub, _ in found:  # the list index of an item named by its class_path
        part = sub[len(path)] if len(sub) > len(path) else None
        if isinstance(part, _Class) and isinstance(value, list):
            paths = [item.get("class_path", "") if isinstance(item, dict) else "" for item in value]
            part.index = next((i for i, p in enumerate(paths) if p and (p in part.path or part.path in p)), None)
    if max((score for score, _, _ in found), default=0) <= 1:
        expected = [message for score, _, message in found if score == 1]
        choices = [message[len("one of ") :] for message in expected if message.startswith("one of ")]
        expected = [message for message in expected if not message.startswith("one of ")]
        expected += [f"one of {', '.join(choices)}"] if choices else []
        return [(2, path, f"invalid value {given.strip()!r} for \0: expected {' or '.join(expected) or 'another'}")]
    return found


def _type_name(text: str) -> str:
    """``<class 'float'>`` -> ``float``, ``<class 'NoneType'>`` -> ``null``, ``typing.Literal[1, 2]`` -> ``one of
    1, 2``."""
    text = text.strip()
    if match := re.fullmatch(r"<class '([\w.]+)'>", text):
        return "null" if match[1] == "NoneType" else match[1].rpartition(".")[2]
    if match := re.fullmatch(r"typing\.Literal\[(.*)\]", text):
        return f"one of {match[1]}"
    return text


def _submodules(module: Any) -> list[str]:
    import pkgutil

    return [info.name for info in pkgutil.iter_modules(getattr(module, "__path__", None) or [])]


def _config_files(argv: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files on a command line."""
    files = [b for a, b in zip(argv, argv[1:], strict=False) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _explain_parse_error(message: str, parser: Any = None, configs: list[str] | None = None) -> str:
    """jsonargparse's message (usage, nested Union subtypes, the given value) -> one line naming the key, value or
    path, with a "did you mean" where a key, option or class is close to a known one."""
    keys, options = _parser_keys(parser)
    found = _findings(message, [], {"keys": keys, "options": options, "configs": configs})
    if not found:
        return " ".join(message.split())
    _, path, line = max(found, key=lambda f: f[0])  # the first of the most specific
    where = _where(path)
    line = line.replace("\0: ", f"{where}: " if where else "").replace("\0", repr(where) if where else "the value")
    return line


def _raising_class(exc: BaseException) -> str | None:
    """The class whose ``__init__`` the exception came out of (the outermost one), e.g. ``DataSelectionCallback``."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if owner is not None and not type(owner).__module__.startswith(("jsonargparse", "argparse")):
            return type(owner).__name__
        tb = tb.tb_next
    return None


def _explain_exception(exc: BaseException, *, owner: bool = False) -> tuple[BaseException, str]:
    """The exception a user error comes down to (jsonargparse wraps the one raised while building a class in its
    Union message) and one line for it; with ``owner``, prefixed by the class that raised it."""
    root = exc
    while isinstance(root.__cause__, Exception) and str(root).startswith(_WRAPPERS):
        root = root.__cause__
    text = str(root)
    message = _explain_parse_error(text) if text.startswith(_WRAPPERS) else " ".join(text.split())
    message = message or type(root).__name__
    name = _raising_class(root) if owner else None
    if name and name not in message:
        message = f"{name}: {message}"
    return root, message


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


def _fail(command: str | None, message: str, hint: str) -> NoReturn:
    """Print a user error as one line and a hint on stderr, and exit with code 2."""
    prog = f"lightning-chips {command}" if command else "lightning-chips"
    print(f"{prog}: error: {message}", file=sys.stderr)
    print(f"  ({hint})", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-chips`` console script and of ``python -m lightning_chips``.

    A user error (an unknown or misspelled key or option, an invalid value, a missing file or checkpoint; see
    :func:`_user_error_types`) is one line on stderr and a hint, exit code 2; ``--verbose`` shows the parser's full
    message or the traceback instead. ``score --strict`` exits with code 3 when the run skipped samples or met
    unreadable shards (after writing its outputs).
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
        _fail(None, f"unknown subcommand {command!r}{_did_you_mean(command, known)}",
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
        except _UserError as exc:
            _fail(command_, str(exc), hint)
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
        _fail(command, _explain_parse_error(str(exc), parser, _config_files(rest)), hint)
    except _UserError as exc:
        _fail(command, str(exc), hint)
    except _user_error_types() as exc:
        root, message = _explain_exception(exc)
        if verbose or not isinstance(root, _user_error_types()):  # a bug that jsonargparse wrapped keeps its traceback
            raise
        _fail(command, message, hint)
    if strict:
        failed = _strict_failures(result)
        if failed:
            print(f"lightning-chips {command}: --strict: {failed} (see manifest.json)", file=sys.stderr)
            raise SystemExit(EXIT_STRICT)
