"""Checks of single samples: what makes a pair unusable, and the reason a skipped pair is reported with.

A bad sample is skipped and counted with its id and reason, never dropped silently and never a crash inside a
dataloader worker. The byte-level checks (:func:`decode_caption`, :func:`decode_image`, :func:`parse_id`) serve
WebDataset shards and image folders (:func:`~lightning_chips.data.webdataset.decode_pair`); :class:`CheckedPairs`
applies them, and catches the user's loading errors, for map-style pools
(:class:`~lightning_chips.data.ScoredSubsetDataModule`). A shard's bad samples and read error are gathered in its
:class:`ShardReport`.
"""

from __future__ import annotations

import re
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "SkippedSample",
    "BadSample",
    "ShardReport",
    "CheckedPairs",
    "check_pair",
    "decode_caption",
    "decode_image",
    "describe_error",
    "format_traceback",
    "parse_id",
]

_INT64 = np.iinfo(np.int64)
_MAX_ID_LENGTH = 1024


class BadSample(ValueError):
    """Raised by a dataset's ``__getitem__`` (or a check) for a sample that cannot be used.

    :class:`CheckedPairs` turns it into a :class:`SkippedSample` with this ``reason`` (and ``id``, when known), so the
    pair is skipped and reported rather than ending the job.

    Args:
        reason: why the sample is unusable (``"empty caption"``, ``"undecodable image: ..."``).
        id: the sample's id, when it is known.
    """

    def __init__(self, reason: str, id: int | str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.id = reason, id


@dataclass(frozen=True)
class SkippedSample:
    """A pair a selection round, a scoring pass or a training stream could not use, or the unread rest of a shard:
    the one record of a skipped sample, whatever the pool.

    A map-style pool names the pair by ``index`` (its dataset index); a shard pool by ``shard`` (the URL) and
    ``key`` (the tar key). ``id`` is the pair's id when it has a usable one. ``kind="shard"`` is not a pair: the
    rest of ``shard`` could not be read, and ``reason`` is the read error. ``traceback`` is the formatted traceback
    of the user's loading error for a map-style pair whose ``__getitem__`` raised (not in its repr or equality; a
    round keeps only the first one, for the ``max_skipped`` error).

    Example::

        >>> SkippedSample("empty caption", id=7, index=3)
        SkippedSample(reason='empty caption', id=7, index=3, key=None, shard=None, kind='pair')
    """

    reason: str
    id: int | str | None = None
    index: int | None = None
    key: str | None = None
    shard: str | None = None
    kind: Literal["pair", "shard"] = "pair"
    traceback: str = field(default="", repr=False, compare=False)

    def describe(self) -> str:
        """One phrase naming the sample and the reason, for messages."""
        if self.kind == "shard":
            return f"shard {self.shard}: {self.reason}"
        if self.shard is not None:
            return f"uid {self.id} (key {self.key} of {self.shard}): {self.reason}"
        return f"id {self.id} (index {self.index}): {self.reason}"


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, short and without object reprs (which hold memory addresses)."""
    detail = re.sub(r" ?<[^>]*>", "", str(exc))[:120]
    return f"{type(exc).__name__}: {detail}"


def format_traceback(exc: BaseException, limit: int = 4000) -> str:
    """``exc``'s formatted traceback (its last ``limit`` characters: the frames nearest the error)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


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


def parse_id(value: Any, name: str = "id") -> int | str:
    """A sample id: an int64 integer (Python, NumPy, a one-element integer tensor, or a string of its canonical
    digits, ``"42"``) as an int, or any other non-empty string (a DataComp uid, a WebDataset key) as that string
    (:mod:`lightning_chips.ids`).

    Raises:
        BadSample: ``"missing <name>"`` when ``value`` is None, ``"missing <name> (<name>=... is not an int64 or a
            string)"`` otherwise.
    """
    if value is None:
        raise BadSample(f"missing {name}")
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, np.str_):
        value = str(value)
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > _MAX_ID_LENGTH:
            raise BadSample(f"missing {name} ({name}={value!r:.60} is empty or longer than {_MAX_ID_LENGTH})")
        if text.lstrip("-").isdigit() and str(int(text)) == text and _INT64.min <= int(text) <= _INT64.max:
            return int(text)
        return text
    if isinstance(value, bool) or not isinstance(value, int) or not _INT64.min <= value <= _INT64.max:
        raise BadSample(f"missing {name} ({name}={value!r:.60} is not an int64 or a string)")
    return int(value)


def _is_pil(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)


def check_pair(item: Any, index: int) -> dict[str, Any] | SkippedSample:
    """Validate one map-style pool item ``{"image": Tensor[C, H, W], "text": str | bytes | token ids, "id": int,
    ...}``: the item with its caption decoded and stripped and its id an int, or the :class:`SkippedSample` that says
    why it is unusable (missing or non-int64 id, missing / empty / non-UTF-8 caption, missing image, NaN or inf
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
        return SkippedSample(bad.reason, index=index)
    text = item["text"]
    if text is None or isinstance(text, str | bytes | bytearray):
        try:
            text = decode_caption(text)
        except BadSample as bad:
            return SkippedSample(bad.reason, id=uid, index=index)
    elif not isinstance(text, Tensor | np.ndarray | list | tuple):
        kind = type(text).__name__
        return SkippedSample(f"caption must be a str, bytes or token ids, got {kind}", id=uid, index=index)
    image = item["image"]
    if image is None:
        return SkippedSample("missing image", id=uid, index=index)
    if not isinstance(image, Tensor | np.ndarray) and not _is_pil(image):
        raise TypeError(
            f"Pool item {index} (id {uid}) has an image of type {type(image).__name__}; it must be a PIL image, a "
            "uint8 image or a [3, H, W] float tensor in [0, 1] (the data module applies the model's preprocessing)."
        )
    if isinstance(image, Tensor) and image.is_floating_point() and not bool(torch.isfinite(image).all()):
        return SkippedSample("image has NaN or inf pixels", id=uid, index=index)
    return {**item, "text": text, "id": uid}


class CheckedPairs(Dataset):
    """A map-style pool whose items are checked: item ``i`` is the dataset's item ``i`` (validated by
    :func:`check_pair`), or a :class:`SkippedSample` when loading or validating it failed.

    Loading runs with PIL's decompression-bomb warning raised as an error, so an image over the limit is refused
    by the user's own loading code too. A :class:`BadSample` raised by the dataset gives its reason; any other
    exception gives ``"failed to load: <Type>: <message>"`` and keeps the formatted traceback (in the skipped
    sample's ``traceback``). The collate
    (:class:`~lightning_chips.data.PairCollate`) puts the bad pairs of a batch in ``batch["bad"]``.

    Args:
        dataset: the map-style dataset of ``{"image", "text", "id", ...}`` items.

    Attributes:
        skipped: ``{index: SkippedSample}`` of the bad pairs met in training and evaluation batches, in the main
            process (filled by :class:`~lightning_chips.data.SelectionDataLoader`).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.skipped: dict[int, SkippedSample] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                item = self.dataset[index]
        except BadSample as bad:
            return SkippedSample(bad.reason, id=bad.id, index=int(index))
        except Exception as exc:  # the user's loader failed on this sample: skip it and say why (and where)
            return SkippedSample(f"failed to load: {describe_error(exc)}", index=int(index),
                                 traceback=format_traceback(exc))  # fmt: skip
        return check_pair(item, int(index))

    def __repr__(self) -> str:
        return f"CheckedPairs({self.dataset!r})"


@dataclass
class ShardReport:
    """What reading one shard gave: valid pairs, skipped samples (key and reason) and a read error, if any."""

    url: str
    samples: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    filtered: int = 0
    """Valid pairs left out because they are not in the selection (not an error)."""
    bad_ids: list[int | str | None] = field(default_factory=list)
    """The uid of each entry of :attr:`bad` (None when the sample's json gives none); see :meth:`skip`."""

    def skip(self, key: str, reason: str, uid: int | str | None = None) -> None:
        """Record a skipped sample: its key, the reason and its uid (when its json has one)."""
        self.bad.append((key, reason))
        self.bad_ids.append(uid)

    def bad_samples(self) -> list[SkippedSample]:
        """The skipped samples of this shard, in reading order (an entry of :attr:`bad` added without
        :meth:`skip` has no uid)."""
        ids = self.bad_ids + [None] * (len(self.bad) - len(self.bad_ids))
        return [SkippedSample(reason, id=uid, key=key, shard=self.url)
                for (key, reason), uid in zip(self.bad, ids, strict=False)]  # fmt: skip

    def skipped(self) -> list[SkippedSample]:
        """:meth:`bad_samples`, then the unread rest of the shard (``kind="shard"``) when it could not be read to
        the end."""
        rest = [] if self.error is None else [SkippedSample(self.error, shard=self.url, kind="shard")]
        return self.bad_samples() + rest

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "samples": self.samples,
            "bad": [{"key": k, "reason": r} for k, r in self.bad],
            "error": self.error,
        }
