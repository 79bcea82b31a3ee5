"""Files that cannot be silently wrong: checked atomic writes, loads that name the damaged file, output locks.

* :func:`atomic_writer` (and :func:`atomic_savez`, :func:`atomic_save`, :func:`atomic_write_json`): the content is
  built in memory, written to a temporary name beside the target with checked ``os.write`` calls (a full disk or a
  file-size limit raises ``OSError`` naming the file; numpy's own file writes go through C I/O that drops such
  errors), synced, checked for its size and renamed into place. A crash at any point leaves the previous file or
  the complete new one, never a truncated file under the real name.
* :func:`load_npz`, :func:`load_json`: a truncated, bit-flipped or foreign file is a :class:`CorruptFileError`
  that names the file and says what to do, not ``BadZipFile`` / ``NotImplementedError`` / ``KeyError`` /
  ``JSONDecodeError``; an ``.npz`` whose zip directory lost members to a flipped length field is refused too.
* :func:`umask`, :func:`publish_mode`: files and folders are published with the permissions the process's umask
  gives, as ``open`` and ``mkdir`` would (not the ``0600`` / ``0700`` of ``mkstemp`` / ``mkdtemp``).
* :class:`OutputLock`: an exclusive lock on an output folder for the life of a run (``fcntl.flock`` on a lock file
  holding the owner's pid, host, start time and command). A second run is refused with one line naming the
  owner; the kernel releases the lock of a process that dies, so a killed run's lock is taken over by the next
  run, which says whose it was. :func:`remove_stale_temporaries` then removes the temporary files the killed run
  left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "READ_ERRORS",
    "CorruptFileError",
    "OutputLock",
    "OutputLockedError",
    "atomic_save",
    "atomic_savez",
    "atomic_write_json",
    "atomic_writer",
    "load_json",
    "load_npz",
    "publish_mode",
    "remove_stale_temporaries",
    "umask",
]

TEMP_SUFFIX = ".tmp"


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, damaged, or another kind of file)."""


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(directory: bool = False) -> int:
    """The mode ``open`` (``0o666``) or ``mkdir`` (``0o777``, ``directory=True``) gives under the current umask: what
    a result built under ``mkstemp`` / ``mkdtemp`` (``0600`` / ``0700``) is set to before it is published."""
    return (0o777 if directory else 0o666) & ~umask()


def _write_all(fd: int, data: memoryview, path: Path) -> None:
    """``os.write`` until every byte is written; a failed or short write raises ``OSError`` naming ``path``."""
    written = 0
    while written < len(data):
        try:
            n = os.write(fd, data[written:])
        except OSError as exc:
            raise OSError(exc.errno, f"could not write {path}: {exc.strerror}", str(path)) from exc
        if n <= 0:
            raise OSError(errno.EIO, f"could not write {path}: the disk accepted no more bytes", str(path))
        written += n


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs directories (nor needs to)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield an in-memory file; on a clean exit write it to ``path`` atomically and check every byte.

    The bytes go to a temporary file ``.NAME.*.tmp`` in ``path``'s directory through checked ``os.write`` calls,
    are synced, the file's size is compared with what was written, and the file is renamed to ``path`` (then the
    directory is synced). A failed write (full disk, file-size limit) raises ``OSError`` naming ``path`` and
    leaves the previous ``path`` intact; so does an exception in the ``with`` body. A SIGKILL leaves at most a
    ``.NAME.*.tmp`` file, which readers ignore and the next locked run of the folder removes
    (:func:`remove_stale_temporaries`).

    Args:
        path: the file to write.
        mode: ``"wb"`` (bytes) or ``"w"`` (UTF-8 text).

    Example::

        >>> with atomic_writer(tmp / "a.json", "w") as f:  # doctest: +SKIP
        ...     f.write("{}")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer writes whole files: mode must be 'wb' or 'w', got {mode!r}.")
    path = Path(path)
    buffer: IO[Any] = io.BytesIO() if mode == "wb" else io.StringIO()
    yield buffer
    data = buffer.getbuffer() if mode == "wb" else memoryview(buffer.getvalue().encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        try:
            _write_all(fd, data, path)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != len(data):
            raise OSError(errno.EIO, f"could not write {path}: {size} of {len(data)} bytes reached the disk", str(path))
        os.chmod(tmp, publish_mode())  # mkstemp creates 0600; these are ordinary results
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)``, atomically and checked (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        np.savez(f, **{key: np.asarray(value) for key, value in arrays.items()})
    return Path(path)


def atomic_save(path: str | os.PathLike, array: Any) -> Path:
    """``np.save(path, array)``, atomically and checked (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        np.save(f, np.asarray(array))
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as indented JSON, atomically and checked (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=default)
        f.write("\n")
    return Path(path)


READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zlib.error, ValueError, KeyError, EOFError, OSError, UnicodeDecodeError,
    RuntimeError,  # zipfile on a flipped flag or method field: "is encrypted", NotImplementedError "compression ..."
    struct.error, OverflowError, MemoryError, TypeError, IndexError, AttributeError,  # corrupt zip or .npy headers
)  # fmt: skip
"""What reading a damaged ``.npz`` / ``.npy`` can raise (zipfile and numpy's header parsing)."""


def _zip_directory_entries(path: Path) -> int | None:
    """The number of members the end-of-central-directory record of the zip at ``path`` announces (None when it
    cannot be told: no record, or a ZIP64 count)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 22 - 65535))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    (entries,) = struct.unpack("<H", tail[at + 10 : at + 12])
    return None if entries == 0xFFFF else entries


def load_npz(path: str | os.PathLike, keys: Iterable[str], *, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, read in full, with the ``keys`` it must hold.

    Besides the zip's CRCs (which catch any damage to the arrays' bytes), the members read are counted against the
    number the zip's end record announces: a flipped length field in the zip directory can otherwise hide the
    members after it.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CorruptFileError: when the file is truncated, damaged (CRC, zip directory, ``.npy`` header), not an
            ``.npz``, or lacks a key; the message names ``path``, ``what`` it should be and ``fix``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No {what} at {path}. {fix}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds a single {type(loaded).__name__}, not a zip of arrays")
        with loaded as f:
            arrays = {key: f[key] for key in f.files}
            members = len(f.zip.infolist())
        announced = _zip_directory_entries(path)
        if announced is not None and announced != members:
            raise zipfile.BadZipFile(f"its zip directory announces {announced} members but {members} can be read")
    except FileNotFoundError:
        raise
    except READ_ERRORS as exc:
        raise CorruptFileError(f"{path} is damaged or is not a {what} ({type(exc).__name__}: {exc}). {fix}") from exc
    missing = sorted(set(keys) - set(arrays))
    if missing:
        raise CorruptFileError(f"{path} is not a {what}: it lacks {', '.join(missing)}. {fix}")
    return arrays


def load_json(path: str | os.PathLike, *, what: str, fix: str) -> Any:
    """The JSON at ``path``; a missing file is ``FileNotFoundError`` and a damaged one :class:`CorruptFileError`,
    both naming ``path``, ``what`` it should be and ``fix``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No {what} at {path}. {fix}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CorruptFileError(f"{path} is damaged or is not a {what} ({type(exc).__name__}: {exc}). {fix}") from exc


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files :func:`atomic_writer` leaves when a process is killed mid-write.

    Call it only while holding the folder's :class:`OutputLock` (then no live writer owns them). Returns the
    removed paths.
    """
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


class OutputLock:
    """An exclusive lock on an output folder for the life of a run.

    The lock is ``fcntl.flock`` on the file ``lock_path`` (created if needed), which holds the owner's pid, host,
    start time and command while it is held. :meth:`acquire` raises :class:`OutputLockedError` naming the owner if
    another live process holds it. The kernel drops the lock of a process that dies (SIGKILL included), so the
    next run takes a killed run's lock over; :attr:`stale` then holds what the killed run wrote in the file. The
    file itself stays (emptied on release): removing it could let two runs lock two different files. ``flock``
    works between processes of one host and, on Linux, on NFS (as a POSIX lock); on file systems without locks
    the refusal is not guaranteed.

    Example::

        >>> with OutputLock("scores/chips/.lightning-chips.lock", what="score"):  # doctest: +SKIP
        ...     ...  # write into scores/chips
    """

    def __init__(self, lock_path: str | os.PathLike, *, what: str) -> None:
        self.path = Path(lock_path)
        self.what = what
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        if not raw.strip():
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return {"unreadable": raw[:200].decode("utf-8", "replace")}

    @staticmethod
    def describe(owner: dict[str, Any] | None) -> str:
        """``pid P on host H since T (command)`` for an owner record."""
        if not owner:
            return "an unknown process"
        if "unreadable" in owner:
            return f"an unknown process (lock file content: {owner['unreadable']!r})"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        return f"pid {owner.get('pid')} on host {owner.get('host')} since {started} ({owner.get('command', '?')})"

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputLockedError`; a dead owner's lock is taken over."""
        if self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = self._read(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLockedError(
                f"{self.path.parent} is in use by another `{self.what}` run: {self.describe(owner)}. Wait for it to "
                f"finish, or write to another output folder. (Lock file: {self.path}.)"
            ) from None
        try:
            self.stale = self._read(fd)
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500] if sys.argv else "",
            }
            os.ftruncate(fd, 0)
            _write_all(fd, memoryview(json.dumps(record).encode()), self.path)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (also done by the kernel if the process dies)."""
        if self.fd is None:
            return
        import fcntl

        try:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
