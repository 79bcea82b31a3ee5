"""``ImageCaptionFolder``: a directory of images with captions as a map-style dataset of pairs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from lightning_chips.data.checks import BadSample, describe_error
from lightning_chips.data.decode import Reason, decode_pair, image_transform, read_uid, split_member

__all__ = ["ImageCaptionFolder"]


class ImageCaptionFolder(Dataset):
    """A directory of ``NAME.{jpg,png,webp}`` images with ``NAME.txt`` captions as a map-style dataset of
    ``{"image", "text", "id"}``; ids are positions in the sorted list of names, unless a ``NAME.json`` gives a
    ``uid``.

    By default every pair is decoded once, here, and kept in memory (a small target set); unusable pairs are
    listed in :attr:`bad` (name, reason) and left out. With ``lazy=True`` (a pool of any size) only the names
    and ids are read here: every name is an item, its files are read and decoded in ``__getitem__``, and an
    unusable one raises :class:`~lightning_chips.data.checks.BadSample` with its id and reason, which
    :class:`~lightning_chips.data.ScoredSubsetDataModule` skips and reports (the round file names it).

    Args:
        root: the directory.
        image_size: side of the square images (resize + centre crop); ignored when ``transform`` is given.
        transform: PIL image -> tensor, instead of the default :func:`image_transform`.
        uid_field: the id's field in each ``NAME.json`` (an int64 or a string).
        lazy: read and decode each pair when it is asked for, instead of all of them now.

    Example::

        >>> pool = ImageCaptionFolder("images/", image_size=224, lazy=True)
        >>> data = ScoredSubsetDataModule(pool, ImageCaptionFolder("target/", image_size=224))
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int = 224,
        transform: Callable[[Any], Tensor] | None = None,
        uid_field: str = "uid",
        lazy: bool = False,
    ) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"{root!r} is not a directory.")
        self.transform = transform if transform is not None else image_transform(image_size)
        self.uid_field, self.lazy = uid_field, lazy
        groups: dict[str, dict[str, str]] = {}
        for name in sorted(os.listdir(root)):
            split = split_member(name)
            if split is not None:
                groups.setdefault(split[0], {})[split[1]] = os.path.join(root, name)
        self.root, self.pairs, self.bad = root, [], []
        self.names: list[str] = []
        self.files: list[dict[str, str]] = []
        self._ids: list[int | str] = []
        for position, (key, files) in enumerate(sorted(groups.items())):
            if lazy:
                self.names.append(key)
                self.files.append(files)
                self._ids.append(self._read_id(files, position))
                continue
            pair = decode_pair(self._read(files, position), self.transform, uid_field=uid_field)
            if isinstance(pair, str):
                self.bad.append((key, pair))
            else:
                self.pairs.append(pair)
        if not (self.files if lazy else self.pairs):
            raise ValueError(f"No usable image-caption pair in {root!r} (bad: {self.bad[:3]}).")

    def _read(self, files: dict[str, str], position: int) -> dict[str, bytes]:
        raw = {}
        for ext, path in files.items():
            with open(path, "rb") as f:
                raw[ext] = f.read()
        raw.setdefault("json", json.dumps({self.uid_field: position}).encode())
        return raw

    def _read_id(self, files: dict[str, str], position: int) -> int | str:
        if "json" not in files:
            return position
        with open(files["json"], "rb") as f:
            return read_uid(f.read(), self.uid_field)

    def __len__(self) -> int:
        return len(self.files) if self.lazy else len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.lazy:
            return self.pairs[index]
        uid = self._ids[index]
        if isinstance(uid, Reason):
            raise BadSample(str(uid))
        try:
            raw = self._read(self.files[index], uid)
        except OSError as exc:
            raise BadSample(f"unreadable file: {describe_error(exc)}", uid) from None
        pair = decode_pair(raw, self.transform, uid_field=self.uid_field)
        if isinstance(pair, str):
            raise BadSample(pair, uid)
        return pair
