"""How the ``lightning-chips`` command line answers a mistake in its input (docs/cli.md): a user error (an unknown
or misspelled key, an invalid value, a missing file or checkpoint) is one line that names the key, value or path,
with a "did you mean" where one is close, and a hint; exit code 2. jsonargparse's nested messages and the
exceptions it wraps are distilled here; :mod:`lightning_chips.cli` decides when to use them (not with
``--verbose``).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NoReturn

__all__ = [
    "EXIT_USER_ERROR",
    "UserError",
    "ckpt_path_problem",
    "config_files",
    "did_you_mean",
    "explain_exception",
    "explain_parse_error",
    "fail",
    "strict_failures",
    "user_error_types",
]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the command's input, already said in one line."""


def ckpt_path_problem(ckpt_path: Any) -> str | None:
    """What is wrong with ``--ckpt_path``: a local path that does not exist (``last``, ``best``, ``hpc``,
    ``registry...`` and URLs are Lightning's to resolve)."""
    if not isinstance(ckpt_path, (str, os.PathLike)):
        return None
    path = os.fspath(ckpt_path)
    if path in ("best", "last", "hpc") or path.startswith("registry") or "://" in path or os.path.exists(path):
        return None
    return (f"--ckpt_path {path!r}: no such checkpoint file (give a .ckpt file, or 'last' / 'best' for the "
            "trainer's own)")  # fmt: skip


def user_error_types() -> tuple[type[BaseException], ...]:
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


def did_you_mean(word: str, candidates: Any) -> str:
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
        hint = did_you_mean(key, _init_parameters(owner.path)) if owner else ""
        about = f" ({owner.path} has no parameter {key!r})" if owner else ""
        return [(5, [*path, key], f"unknown key \0{about}{hint}")]
    if match := re.match(r"(?:Subcommand '[^']+'|Group '([^']+)') does not accept option '([^']+)'", first):
        key = f"{match[1]}.{match[2]}" if match[1] else match[2]
        known = {".".join(k.split(".")[:i]) for k in ctx["keys"] for i in range(1, k.count(".") + 2)}
        parts = key.split(".")  # a misspelled group (`traner:`) is named, not the first key under it
        key = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in known), key)
        same_depth = [k for k in known if k.count(".") == key.count(".")]
        return [(5, [*path, key], f"unknown key \0{did_you_mean(key, same_depth)}")]
    if match := re.match(r"unrecognized arguments: (.*)$", first):
        words = match[1].split()
        option = next((w for w in words if w.startswith("-")), None)
        if option is None:
            return [(5, path, f"unexpected argument {words[0]!r}" if words else first)]
        option = option.split("=", 1)[0]
        return [(5, path, f"unknown option {option!r}{did_you_mean(option, ctx['options'])}")]
    if match := re.match(r"Expected a (.+?)\. Got value: (.*)$", " ".join(lines).strip()):
        return [(4, path, f"invalid value {match[2]!r} for \0: expected {_type_name(match[1])}")]
    if match := re.match(r"Expected a dot import path string: (.*)$", first):
        name = match[1].strip()
        names = _subclass_names(ctx.get("subtypes", ""), dotted="." in name)
        return [(3, path, f"\0: unknown class {name!r}{did_you_mean(name, names)}")]
    if match := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", first):
        module = sys.modules.get(match[1])
        names = [*dir(module), *_submodules(module)]
        given = f" {classes[-1].path!r}" if classes else ""
        return [(4, path, f"\0: cannot import{given}: {first}{did_you_mean(match[2], names)}")]
    if match := re.match(r"No module named '([\w.]+)'", first):
        parent, _, name = match[1].rpartition(".")
        names = _submodules(sys.modules.get(parent)) if parent else []
        return [(4, path, f"\0: {first}{did_you_mean(name, names)}")]
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


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files on a command line."""
    files = [b for a, b in zip(argv, argv[1:], strict=False) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def explain_parse_error(message: str, parser: Any = None, configs: list[str] | None = None) -> str:
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


def explain_exception(exc: BaseException, *, owner: bool = False) -> tuple[BaseException, str]:
    """The exception a user error comes down to (jsonargparse wraps the one raised while building a class in its
    Union message) and one line for it; with ``owner``, prefixed by the class that raised it."""
    root = exc
    while isinstance(root.__cause__, Exception) and str(root).startswith(_WRAPPERS):
        root = root.__cause__
    text = str(root)
    message = explain_parse_error(text) if text.startswith(_WRAPPERS) else " ".join(text.split())
    message = message or type(root).__name__
    name = _raising_class(root) if owner else None
    if name and name not in message:
        message = f"{name}: {message}"
    return root, message


def strict_failures(scores: Any) -> str | None:
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


def fail(command: str | None, message: str, hint: str) -> NoReturn:
    """Print a user error as one line and a hint on stderr, and exit with code 2."""
    prog = f"lightning-chips {command}" if command else "lightning-chips"
    print(f"{prog}: error: {message}", file=sys.stderr)
    print(f"  ({hint})", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)
