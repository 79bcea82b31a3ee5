"""Write small WebDataset pools for tests: built-in pairs as PNG + caption + uid json, with chosen faults."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from lightning_chips.data import TwoDomainPairs


def png_bytes(image) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pool(
    directory: Path,
    num_pairs: int = 48,
    per_shard: int = 8,
    *,
    uid_offset: int = 10**12,
    corrupt_image: int | None = None,
    missing_caption: int | None = None,
    target_fraction: float = 0.3,
    split: str = "train",
    prefix: str = "pool",
    duplicate_uids: dict[int, int] | None = None,
    string_uids: bool = False,
    json_fields: tuple[str, ...] = (),
) -> dict[int | str, dict]:
    """Shards ``prefix-%06d.tar`` of built-in pairs with uid = ``uid_offset + index``; returns the valid pairs
    by uid (``{"png": bytes, "text": str}``, the first pair of a repeated uid). ``corrupt_image`` /
    ``missing_caption`` are pair indices; ``duplicate_uids`` maps a pair index to the index whose uid it repeats
    (a different pair under the same uid); ``string_uids`` makes every uid the string ``f"u-{uid}"``;
    ``json_fields`` copies these fields of each built-in item (``"domain"``, ``"label"``, ``"noisy"``) into its
    json."""
    directory.mkdir(parents=True, exist_ok=True)
    data = TwoDomainPairs(num_pairs, target_fraction=target_fraction, split=split, image_size=32)
    valid = {}
    with wds.ShardWriter(str(directory / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(num_pairs):
            item = data[i]
            uid: int | str = uid_offset + (duplicate_uids or {}).get(i, i)
            if string_uids:
                uid = f"u-{uid}"
            meta = {"uid": uid, **{field: item[field] for field in json_fields}}
            sample = {"__key__": f"s{i:06d}", "json": json.dumps(meta).encode()}
            sample["png"] = b"\x89PNG not really an image" if i == corrupt_image else png_bytes(item["image"])
            if i != missing_caption:
                sample["txt"] = item["text"].encode()
            sink.write(sample)
            if i not in (corrupt_image, missing_caption) and uid not in valid:
                valid[uid] = {"png": sample["png"], "text": item["text"]}
    return valid
