"""Checks of single samples: what makes a pair unusable, and the reason a skipped pair is reported with.

A bad sample is skipped and counted with its id and reason, never dropped silently and never a crash inside a
dataloader worker. The byte-level checks (:func:`decode_caption`, :func:`decode_image`, :func:`parse_id`) serve
WebDataset shards and image folders (:func:`~lightning_chips.data.webdataset.decode_pair`); :class:`CheckedPairs`
applies them, and catches the user's loading errors, for map-style pools
(:class:`~lightning_chips.data.ScoredSubsetDataModule`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "BadPair",
    "BadSample",
    "CheckedPairs",
    "check_pair",
    "decode_caption",
    "decode_image",
    "describe_error",
    "parse_id",
]

_INT64 = np.iinfo(np.int64)


class BadSample(ValueError):
    """Raised by a dataset's ``__getitem__`` (or a check) for a sample that cannot be used.

    :class:`CheckedPairs` turns it into a :class:`BadPair` with this ``reason`` (and ``id``, when known), so the
    pair is skipped and reported rather than ending the job.

    Args:
        reason: why the sample is unusable (``"empty caption"``, ``"undecodable image: ..."``).
        id: the sample's id, when it is known.
    """

    def __init__(self, reason: str, id: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.id = reason, id


@dataclass(frozen=True)
class BadPair:
    """A pool item that was skipped: its dataset index, its id (None when it has none) and the reason."""

    index: int
    id: int | None
    reason: str


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, short and without object reprs (which hold memory addresses)."""
    detail = re.sub(r" ?<[^>]*>", "", str(exc))[:120]
    return f"{type(exc).__name__}: {detail}"


def decode_caption(data: bytes | str | None) -> str:
    """The caption, stripped of surrounding whitespace.

    Raises:
        BadSample: ``"missing caption"``, ``"caption is not UTF-8"`` or ``"empty caption"``.
    """
    if data is None:
        raise BadSample("missing caption")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("caption is not UTF-8") from None
    caption = data.strip()
    if not caption:
        raise BadSample("empty caption")
    return caption


def decode_image(data: bytes, transform: Callable[[Any], Tensor]) -> Tensor:
    """Decode image bytes with PIL (to RGB) and apply ``transform``.

    An image over PIL's decompression-bomb limit is refused before its pixels are decoded.

    Raises:
        BadSample: ``"empty image file"`` or ``"undecodable image: <error>"``.
    """
    import io

    from PIL import Image

    if not data:
        raise BadSample("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = img.convert("RGB")
        return transform(image)
    except Exception as exc:  # any decoder failure: PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadSample(f"undecodable image: {describe_error(exc)}") from None


def parse_id(value: Any, name: str = "id") -> int:
    """A sample id as a Python int: an int64 integer (Python, NumPy, a one-element integer tensor) or a string of
    digits.

    Raises:
        BadSample: ``"missing <name>"`` when ``value`` is None, ``"missing <name> (<name>=... is not an int64)"``
            otherwise.
    """
    if value is None:
        raise BadSample(f"missing {name}")
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not _INT64.min <= value <= _INT64.max:
        raise BadSample(f"missing {name} ({name}={value!r:.60} is not an int64)")
    return int(value)


def check_pair(item: Any, index: int) -> dict[str, Any] | BadPair:
    """Validate one map-style pool item ``{"image": Tensor[C, H, W], "text": str | bytes | token ids, "id": int,
    ...}``: the item with its caption decoded and stripped and its id an int, or the :class:`BadPair` that says why
    it is unusable (missing or non-int64 id, missing / empty / non-UTF-8 caption, missing image, NaN or inf
    pixels). A very long caption is kept: the tokenizer truncates it to the context length.

    Raises:
        TypeError: when ``item`` is not a dict with ``"image"`` and ``"text"`` keys, or its image is not a tensor
            (the dataset returns the wrong thing for every item, not one bad sample).
    """
    if not isinstance(item, Mapping) or "image" not in item or "text" not in item:
        got = f"a dict with keys {sorted(map(str, item))}" if isinstance(item, Mapping) else type(item).__name__
        raise TypeError(
            f"Pool item {index} must be a dict {{'image': Tensor[3, H, W], 'text': str, 'id': int}} (optionally "
            f"'label'), got {got}; make the dataset's __getitem__ return that."
        )
    try:
        uid = parse_id(item.get("id"))
    except BadSample as bad:
        return BadPair(index, None, bad.reason)
    text = item["text"]
    if text is None or isinstance(text, str | bytes | bytearray):
        try:
            text = decode_caption(text)
        except BadSample as bad:
            return BadPair(index, uid, bad.reason)
    elif not isinstance(text, Tensor | np.ndarray | list | tuple):
        return BadPair(index, uid, f"caption must be a str, bytes or token ids, got {type(text).__name__}")
    image = item["image"]
    if image is None:
        return BadPair(index, uid, "missing image")
    if not isinstance(image, Tensor):
        raise TypeError(
            f"Pool item {index} (id {uid}) has an image of type {type(image).__name__}; it must be a [3, H, W] "
            "float tensor (apply a transform such as lightning_chips.data.webdataset.image_transform)."
        )
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        return BadPair(index, uid, "image has NaN or inf pixels")
    return {**item, "text": text, "id": uid}


class CheckedPairs(Dataset):
    """A map-style pool whose items are checked: item ``i`` is the dataset's item ``i`` (validated by
    :func:`check_pair`), or a :class:`BadPair` when loading or validating it failed.

    Loading runs with PIL's decompression-bomb warning raised as an error, so an image over the limit is refused
    by the user's own loading code too. A :class:`BadSample` raised by the dataset gives its reason; any other
    exception gives ``"failed to load: <Type>: <message>"``. The collate
    (:class:`~lightning_chips.data.PairCollate`) puts the bad pairs of a batch in ``batch["bad"]``.

    Args:
        dataset: the map-style dataset of ``{"image", "text", "id", ...}`` items.

    Attributes:
        skipped: ``{index: BadPair}`` of the bad pairs met in training and evaluation batches, in the main
            process (filled by :class:`~lightning_chips.data.SelectionDataLoader`).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skipped: dict[int, BadPair] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | BadPair:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                item = self.dataset[index]
        except BadSample as bad:
            return BadPair(int(index), bad.id, bad.reason)
        except Exception as exc:  # the user's loader failed on this sample: skip it and say why
            return BadPair(int(index), None, f"failed to load: {describe_error(exc)}")
        return check_pair(item, int(index))

    def __repr__(self) -> str:
        return f"CheckedPairs({self.dataset!r})"
