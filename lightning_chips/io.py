"""Crash-safe file writes: every result file is written to a temporary name in its directory and renamed."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_savez", "atomic_write_json", "atomic_writer"]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it to ``path``.

    A crash (or SIGKILL) at any point leaves either the previous ``path`` or the complete new one, never a
    half-written file; the temporary file is removed on an exception (a SIGKILL leaves a ``.name.*.tmp`` that
    readers ignore).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary results
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)``, atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        np.savez(f, **{key: np.asarray(value) for key, value in arrays.items()})
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as indented JSON, atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=default)
        f.write("\n")
    return Path(path)
