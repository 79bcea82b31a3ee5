"""Target sets read whole into memory: a folder of ``NAME.jpg`` + ``NAME.txt`` files or WebDataset shards.

The target set of a selection round is small (hundreds to a few thousand pairs), so it is decoded once and held
as a list of pair dicts; :func:`load_target_pairs` also reports what it skipped. Used by ``lightning-chips score``
and :class:`~lightning_chips.data.WebDatasetDataModule`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch.utils.data import Dataset

from lightning_chips.data.checks import ShardReport
from lightning_chips.data.folder import ImageCaptionFolder
from lightning_chips.data.webdataset import WebDatasetPairs

__all__ = ["TARGET_HINT", "ListDataset", "is_image_folder", "load_target_pairs"]


def is_image_folder(spec: str | Sequence[str]) -> bool:
    if not isinstance(spec, str | os.PathLike) or not os.path.isdir(spec):
        return False
    return not any(name.endswith((".tar", ".tar.gz", ".tgz")) for name in os.listdir(spec))


TARGET_HINT = (
    "Pass `target` (`--target`): WebDataset shards or a folder of NAME.jpg + NAME.txt files holding at least one "
    "valid image-caption pair."
)


def load_target_pairs(spec: str | Sequence[str], image_size: int, uid_field: str) -> tuple[list[dict], dict]:
    """All target pairs in memory (the target set is small) and a report of what was skipped.

    Raises:
        ValueError: when the target cannot be read or holds no usable pair (before any file is written).
    """
    try:
        if is_image_folder(spec):
            folder = ImageCaptionFolder(spec, image_size=image_size, uid_field=uid_field)
            pairs, bad = list(folder.pairs), [{"key": k, "reason": r} for k, r in folder.bad]
            errors: list[str] = []
        else:
            data = WebDatasetPairs(spec, image_size=image_size, uid_field=uid_field, reports=True)
            pairs, bad, errors = [], [], []
            for item in data:
                if isinstance(item, ShardReport):
                    bad.extend({"key": k, "reason": r} for k, r in item.bad)
                    if item.error:
                        errors.append(f"{item.url}: {item.error}")
                else:
                    pairs.append(item)
    except ValueError as exc:
        raise ValueError(f"The target {spec!r} cannot be read: {exc} {TARGET_HINT}") from exc
    if not pairs:
        raise ValueError(
            f"The target {spec!r} holds no usable image-caption pair (skipped: {bad[:3]}, read errors: "
            f"{errors[:3]}). {TARGET_HINT}"
        )
    return pairs, {"pairs": len(pairs), "bad": bad, "errors": errors}


class ListDataset(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
