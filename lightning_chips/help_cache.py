"""The subcommands' ``--help`` pages, kept on disk so that asking again answers at once.

A subcommand's help is built from the classes it configures (the Trainer, the LightningModule and data module
bases, the scorers), so building it imports Lightning, which takes seconds (most of it torchmetrics and torchvision,
which Lightning imports). The page only changes with the installed packages, the package's own source and the
terminal width, so the first ``lightning-chips fit --help`` stores what it printed under those keys and later calls
print the stored page without importing anything heavy.

Only a bare ``lightning-chips SUBCOMMAND --help`` (or ``-h``) is cached: with a config or other options the page
can depend on them, so it is built each time. The pages go to ``$LIGHTNING_CHIPS_CACHE/help`` (default
``~/.cache/lightning-chips/help``), written to a temporary name and renamed; ``LIGHTNING_CHIPS_CACHE=""`` turns the
cache off. A cache that cannot be read or written is ignored.

Example::

    >>> key = help_key("fit", columns=100)  # doctest: +SKIP
    >>> cached_help(key) is None  # the first call builds the page, then store_help(key, page)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

__all__ = ["cache_dir", "cached_help", "help_key", "store_help"]

_PACKAGES = ("lightning", "jsonargparse", "torch", "open_clip_torch", "torchmetrics", "webdataset", "lightning-chips")


def cache_dir() -> Path | None:
    """Where help pages go: ``$LIGHTNING_CHIPS_CACHE/help``, else ``~/.cache/lightning-chips/help``; None when
    ``LIGHTNING_CHIPS_CACHE`` is set to an empty string (no cache)."""
    configured = os.environ.get("LIGHTNING_CHIPS_CACHE")
    if configured is not None:
        return Path(configured).expanduser() / "help" if configured else None
    return Path.home() / ".cache" / "lightning-chips" / "help"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def help_key(command: str, columns: int | None = None) -> str:
    """A file name for ``command``'s help that changes whenever the page could: the versions of the packages that
    build it, the package's own source files (size and modification time; an editable install changes them), the
    Python version and the terminal width argparse wraps to."""
    columns = shutil.get_terminal_size().columns if columns is None else columns
    digest = hashlib.sha256()
    digest.update(f"{command}|{columns}|{sys.version_info[:3]}|{sys.executable}".encode())
    for name in _PACKAGES:
        digest.update(f"|{name}={_version(name)}".encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        stat = path.stat()
        digest.update(f"|{path.relative_to(package)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{command}-{digest.hexdigest()[:20]}.txt"


def cached_help(key: str) -> str | None:
    """The stored page of ``key``, or None (no cache, not stored yet, unreadable)."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        return (directory / key).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def store_help(key: str, page: str) -> None:
    """Store ``page`` under ``key`` (temp file + rename, so a reader never sees half a page); errors are ignored:
    the cache only saves time."""
    directory = cache_dir()
    if directory is None or not page:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False) as handle:
            handle.write(page)
        os.replace(handle.name, directory / key)
    except OSError:
        pass
