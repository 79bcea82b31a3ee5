"""One raw sample (``{extension: bytes}``, the members of a tar shard or the files of a folder that share a key)
into a pair ``{"image", "text", "id", "json"}``, or the reason it is unusable; what shard readers
(:mod:`lightning_chips.data.webdataset`) and :class:`~lightning_chips.data.ImageCaptionFolder` share."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from lightning_chips.data.checks import BadSample, decode_caption, decode_image, parse_id

__all__ = ["IMAGE_EXTENSIONS", "Reason", "decode_pair", "image_transform", "known_uid", "read_uid", "split_member"]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


class _ResizeCenterCrop:
    """PIL image -> ``[3, S, S]`` float tensor in [0, 1]: resize the short side to S (bicubic), centre crop."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Any) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.resize(image, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [self.size, self.size])
        return TF.to_tensor(image)


def image_transform(image_size: int) -> Callable[[Any], Tensor]:
    """open_clip's evaluation preprocessing without the normalisation (the collate applies it): resize the short
    side to ``image_size`` (bicubic), centre crop, to a float tensor in [0, 1]. Picklable."""
    if image_size < 1:
        raise ValueError(f"`image_size` must be >= 1, got {image_size}.")
    return _ResizeCenterCrop(image_size)


def decode_pair(
    raw: dict[str, bytes],
    transform: Callable[[Any], Tensor],
    *,
    uid_field: str = "uid",
    image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> dict[str, Any] | str:
    """Decode one raw sample (``{extension: bytes}``) into ``{"image", "text", "id", "json"}``, or return the
    reason it is unusable (``"undecodable image: ..."``, ``"missing caption"``, ``"missing uid"``, ...; see
    :mod:`lightning_chips.data.checks`). ``"json"`` is the sample's parsed json (its other fields: a source, a
    label, ...; what ``group_by`` reads)."""
    uid = read_uid(raw.get("json"), uid_field)
    if isinstance(uid, Reason):
        return str(uid)
    meta = json.loads(raw["json"])  # parsed once more: read_uid succeeded, so it is a dict
    try:
        caption = decode_caption(raw.get("txt"))
        ext = next((e for e in image_extensions if e in raw), None)
        if ext is None:
            return f"missing image (no {'/'.join(image_extensions)} member)"
        image = decode_image(raw[ext], transform)
    except BadSample as bad:
        return bad.reason
    return {"image": image, "text": caption, "id": uid, "json": meta}


class Reason(str):
    """Why a sample is unusable (what :func:`read_uid` returns instead of a uid, which may itself be a string)."""


def read_uid(data: bytes | None, uid_field: str) -> int | str | Reason:
    """The uid (``uid_field`` of the json: an int64 or a string, see :func:`~lightning_chips.data.checks.parse_id`)
    or the :class:`Reason` there is none."""
    if data is None:
        return Reason("missing uid (no json member)")
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return Reason("missing uid (json does not parse)")
    value = meta.get(uid_field) if isinstance(meta, dict) else None
    if value is None:
        return Reason(f"missing uid (no {uid_field!r} in json)")
    try:
        return parse_id(value, name="uid")
    except BadSample:
        return Reason(f"missing uid ({uid_field}={value!r:.60} is not an int64 or a string)")


def known_uid(uid: int | str | Reason) -> int | str | None:
    """A uid from :func:`read_uid`, or None for the :class:`Reason` there is none."""
    return None if isinstance(uid, Reason) else uid


def split_member(name: str) -> tuple[str, str] | None:
    """``dir/KEY.EXT.EXT2`` -> ``("dir/KEY", "ext.ext2")`` (WebDataset's rule: the key ends at the first dot of
    the file name)."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    key, ext = base.split(".", 1)
    return (f"{head}/{key}" if head else key), ext.lower()
