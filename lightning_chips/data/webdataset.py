"""WebDataset pools: image-caption tar shards read as ``{"image", "text", "id"}`` pairs, bad samples counted.

How a shard becomes pairs (expanding shard specs, reading members, sampling, finding pairs by uid), used by every
reader of shards (streaming CPT, ``score``, targets, galleries); a sample's decoding is
:mod:`lightning_chips.data.decode`, its :class:`ShardReport` :mod:`lightning_chips.data.checks`.

A shard holds samples as consecutive tar members that share a key: ``KEY.jpg`` (or ``png`` / ``webp`` /
``jpeg``), ``KEY.txt`` (the caption) and ``KEY.json`` with an int64 ``uid`` (the sample's id: never the tar
member name, which WebDataset cuts at the first dot). img2dataset and ``webdataset.ShardWriter`` write this
layout.

:class:`WebDatasetPairs` is an ``IterableDataset`` over such shards. Rank and world size are bound in the main
process with :meth:`WebDatasetPairs.bind` (WebDataset's default node splitter reads them inside the worker,
where spawned workers see no process group and every rank would read every shard); each rank reads
``shards[rank::world]`` and each of its dataloader workers ``shards_of_rank[worker::num_workers]``.

Nothing is dropped silently: a sample whose image does not decode, whose caption is missing, empty or not UTF-8,
or whose uid is missing is skipped and recorded with its key and reason in the shard's :class:`ShardReport`; a
truncated or unreadable shard ends with an ``error`` in its report and the samples read before the damage are
kept. With ``reports=True`` the dataset yields each :class:`ShardReport` right after the shard's last sample,
so a consumer (the offline ``score`` pass, a streaming selection round) knows when a shard is complete;
:meth:`ShardReport.bad_samples` names each skipped sample as a
:class:`~lightning_chips.data.checks.SkippedSample` (shard, key, uid, reason).
"""

from __future__ import annotations

import glob
import heapq
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from lightning_chips.data.checks import ShardReport
from lightning_chips.data.collate import ShardCollate
from lightning_chips.data.decode import (
    IMAGE_EXTENSIONS,
    Reason,
    decode_pair,
    image_transform,
    known_uid,
    read_uid,
    split_member,
)
from lightning_chips.data.folder import ImageCaptionFolder
from lightning_chips.ids import Id, id_key, id_keys

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_MIN_SHARDS",
    "SAMPLE_PER_SHARD",
    "ImageCaptionFolder",
    "ShardCollate",
    "ShardReport",
    "WebDatasetPairs",
    "decode_pair",
    "expand_shards",
    "find_pairs",
    "image_transform",
    "iter_raw_samples",
    "open_image",
]
# ImageCaptionFolder, ShardCollate and ShardReport live in folder.py, collate.py and checks.py; also importable
# from here, as before.

SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")

SAMPLE_PER_SHARD = 256
"""About the most pairs a pool sample takes from one shard (the default ``per_shard`` of
:meth:`WebDatasetPairs.sample_plan`; a pool of fewer shards than the sample needs gives more): a sample of ``size``
pairs is spread over at least ``ceil(size / 256)`` shards."""

SAMPLE_MIN_SHARDS = 16
"""The fewest shards a pool sample is spread over (every shard of a pool of fewer)."""


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from a WebDataset spec: a brace pattern (``pool-{000000..000127}.tar``), several specs joined
    by ``::`` or given as a list, a directory (its ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` files, sorted) or a glob.

    Local paths are checked eagerly (a missing shard is an error before any work starts); ``pipe:`` and URLs
    with a scheme are passed through.
    """
    import braceexpand

    specs = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    found: list[str] = []
    for spec in specs:
        for part in str(spec).split("::"):
            part = part.strip()
            if not part:
                continue
            if os.path.isdir(part):
                inside = sorted(p for p in glob.glob(os.path.join(part, "*")) if p.endswith(SHARD_SUFFIXES))
                if not inside:
                    raise ValueError(f"Directory {part!r} holds no .tar / .tar.gz / .tgz shards.")
                found.extend(inside)
                continue
            for url in braceexpand.braceexpand(part):
                if _is_remote(url):
                    found.append(url)
                elif any(ch in url for ch in "*?["):
                    matches = sorted(glob.glob(url))
                    if not matches:
                        raise ValueError(f"No shard matches {url!r}.")
                    found.extend(matches)
                elif not os.path.isfile(url):
                    raise ValueError(f"Shard {url!r} does not exist (from the spec {str(spec)!r}).")
                else:
                    found.append(url)
    if not found:
        raise ValueError(f"No shards in {urls!r}.")
    duplicated = sorted({u for u in found if found.count(u) > 1})
    if duplicated:
        raise ValueError(f"Shards listed twice: {duplicated[:5]}.")
    return found


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _open(url: str) -> Any:
    if _is_remote(url):
        import webdataset

        return webdataset.gopen(url, "rb")
    return open(url, "rb")


def iter_raw_samples(
    url: str, report: ShardReport | None = None, uid_field: str = "uid"
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` samples of one shard. A read error (truncated or corrupt tar) ends
    the shard: it is recorded in ``report.error`` (raised when no report is given); the sample being read when
    it happened is recorded as bad (with its uid, ``uid_field`` of its json, when that member was read)."""
    key, members = None, {}
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                split = split_member(info.name)
                if split is None or split[0].rsplit("/", 1)[-1].startswith("__"):
                    continue
                if split[0] != key:
                    if key is not None:
                        yield key, members
                    key, members = split[0], {}
                handle = tar.extractfile(info)
                members[split[1]] = handle.read() if handle is not None else b""
                if len(members[split[1]]) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
        if key is not None:
            yield key, members
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        if report is None:
            raise RuntimeError(f"Shard {url} is unreadable: {message}") from exc
        report.error = f"truncated or unreadable after {report.samples + len(report.bad)} samples ({message})"
        if key is not None:
            report.skip(key, "cut off by the shard's read error", known_uid(read_uid(members.get("json"), uid_field)))


def open_image(data: bytes) -> Any:
    """The PIL image of an image member's bytes, decoded at its full size."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def find_pairs(
    urls: Sequence[str], wanted: Iterable[Id], *, uid_field: str = "uid", decode: Callable[[bytes], Any] = open_image
) -> tuple[dict[Id, tuple[Any, str]], dict[Id, str]]:
    """Read ``wanted`` uids back from shards: ``(found: uid -> (decode(image bytes), caption), missing: uid ->
    reason)``. Reads the shards in order and stops once every uid is found; only the wanted samples' images are
    decoded (one that ``decode`` fails on is missing, with the error). A shard that cannot be read to the end is
    passed over: its error is named in the reason of every uid left missing."""
    keys = {id_key(uid): uid for uid in wanted}
    found: dict[Id, tuple[Any, str]] = {}
    missing: dict[Id, str] = {}
    errors = []
    for url in urls:
        if len(found) + len(missing) == len(keys):
            break
        report = ShardReport(url)
        for _, raw in iter_raw_samples(url, report, uid_field):
            uid = read_uid(raw.get("json"), uid_field)
            given = None if isinstance(uid, Reason) else keys.get(id_key(uid))
            if given is None or given in found or given in missing:
                continue
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if ext is None:
                missing[given] = f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"
                continue
            try:
                found[given] = (decode(raw[ext]), raw.get("txt", b"").decode("utf-8", errors="replace").strip())
            except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
                missing[given] = f"undecodable image ({type(exc).__name__}: {exc})"
            if len(found) + len(missing) == len(keys):
                break
        if report.error:
            errors.append(f"{url}: {report.error}")
    where = f"the {len(urls)} pool shards" if len(urls) != 1 else f"its shard {urls[0]}"
    reason = f"not found in {where}" + (f" ({'; '.join(errors[:3])})" if errors else "")
    for uid in keys.values():
        if uid not in found and uid not in missing:
            missing[uid] = reason
    return found, missing


class WebDatasetPairs(IterableDataset):
    """Image-caption pairs from WebDataset shards, yielded as ``{"image": [3, S, S] in [0, 1], "text": str,
    "id": int}`` (captions are tokenized per batch by the collate, images normalised there).

    Args:
        urls: shards (see :func:`expand_shards`): brace pattern, ``::``-joined specs, list, directory or glob.
        image_size: side of the square images (resize + centre crop); ignored when ``transform`` is given.
        transform: PIL image -> tensor, instead of the default :func:`image_transform`.
        uid_field: the id's field in each sample's ``.json`` (an int64 or a string).
        image_extensions: image members to look for, in order.
        reports: also yield each shard's :class:`ShardReport` after its last sample, and give each pair a
            ``"shard"`` field (the index of its shard in :attr:`urls`).
        selection: sorted ids to keep (the current selection); ``None`` keeps every valid pair.
        skip: shard URLs not to read (already scored, on resume).

    Example::

        >>> pool = WebDatasetPairs("pool/shard-{000000..000009}.tar", image_size=224).bind(rank, world_size)
        >>> loader = DataLoader(pool, batch_size=256, num_workers=8, collate_fn=ShardCollate(tokenizer))
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        image_size: int = 224,
        transform: Callable[[Any], Tensor] | None = None,
        uid_field: str = "uid",
        image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
        reports: bool = False,
        selection: np.ndarray | None = None,
        skip: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.urls = expand_shards(urls)
        self.transform = transform if transform is not None else image_transform(image_size)
        self.uid_field = uid_field
        self.image_extensions = tuple(e.lower() for e in image_extensions)
        self.reports = reports
        self.selection = None if selection is None else np.unique(id_keys(selection))
        self.skip = frozenset(skip)
        self.rank, self.world_size = 0, 1

    def bind(self, rank: int, world_size: int) -> WebDatasetPairs:
        """Bind this copy to ``rank`` of ``world_size`` (call it in the main process, before the DataLoader)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        self.rank, self.world_size = rank, world_size
        return self

    def shards_of_rank(self, rank: int | None = None) -> list[str]:
        """The shards ``rank`` (default: the bound one) reads: ``urls[rank::world_size]`` minus ``skip``."""
        rank = self.rank if rank is None else rank
        return [u for u in self.urls[rank :: self.world_size] if u not in self.skip]

    def known_samples(self, shards: Sequence[str]) -> int | None:
        """The number of samples in ``shards`` when every local shard has the ``NAME_stats.json`` img2dataset
        writes beside ``NAME.tar`` (its ``"successes"``), else None (a tar has no index: counting means reading)."""
        total = 0
        for url in shards:
            base = url[: -len(next((s for s in SHARD_SUFFIXES if url.endswith(s)), ""))] or url
            try:
                with open(f"{base}_stats.json", "rb") as f:
                    total += int(json.load(f)["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return total

    def __iter__(self) -> Iterator[dict[str, Any] | ShardReport]:
        shards = self.shards_of_rank()
        info = get_worker_info()
        if info is not None:
            shards = shards[info.id :: info.num_workers]
        for url in shards:
            yield from self.read_shard(url)

    def read_shard(self, url: str) -> Iterator[dict[str, Any] | ShardReport]:
        """The valid pairs of one shard (filtered by the selection), then its report when ``reports=True``."""
        report = ShardReport(url)
        shard = self.urls.index(url) if self.reports else None
        for key, raw in iter_raw_samples(url, report, self.uid_field):
            pair = decode_pair(raw, self.transform, uid_field=self.uid_field, image_extensions=self.image_extensions)
            if isinstance(pair, str):
                report.skip(key, pair, known_uid(read_uid(raw.get("json"), self.uid_field)))
                continue
            if self.selection is not None and not _contains(self.selection, id_key(pair["id"])):
                report.filtered += 1
                continue
            report.samples += 1
            if shard is not None:
                pair["shard"] = shard
            yield pair
        if self.reports:
            yield report

    def sample_plan(self, size: int | None, seed: int | Sequence[int],
                    per_shard: int = SAMPLE_PER_SHARD) -> list[tuple[int | None, list[int]]]:  # fmt: skip
        """The slots of a pool sample of ``size`` pairs: ``(pairs to take, shards to take them from in turn)``
        (shards as indices in :attr:`urls`). The same on every rank: it depends on the shard list, ``size``,
        ``seed`` and ``per_shard`` only.

        ``size=None``: one slot per shard, taking all of it. Otherwise the shards, shuffled with
        ``numpy.random.default_rng(seed)``, are dealt into ``k = min(#shards, max(SAMPLE_MIN_SHARDS, ceil(size /
        per_shard)))`` chains, and ``size`` is split between the chains in proportion to their lengths (about
        ``size / k`` each: 254 or 262 for 8,192 pairs over 1,000 shards). A slot reads its chain's first shard,
        and the next one only while the shards read fall short of its pairs. (The shares in proportion to the
        lengths make a sample of the pool's size every pair when the shards hold equally many.)

        Raises:
            ValueError: a negative ``size`` or a ``per_shard`` below 1.
        """
        n = len(self.urls)
        if size is None:
            return [(None, [i]) for i in range(n)]
        if size < 0:
            raise ValueError(f"The pool sample's `size` must be >= 0 or None (every pair), got {size}.")
        if per_shard < 1:
            raise ValueError(f"`per_shard` (the most sample pairs from one shard) must be >= 1, got {per_shard}.")
        if size == 0:
            return []
        order = np.random.default_rng(seed).permutation(n).tolist()
        k = min(n, max(SAMPLE_MIN_SHARDS, -(-size // per_shard)))
        chains = [order[j::k] for j in range(k)]
        quotas = _apportion(size, [len(chain) for chain in chains])
        return [(int(q), chain) for q, chain in zip(quotas, chains, strict=True)]

    def sample_pairs(self, size: int | None, seed: int | Sequence[int], *, rank: int = 0, world: int = 1,
                     per_shard: int = SAMPLE_PER_SHARD) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Rank ``rank``'s part of the pool sample: the pairs of the slots ``sample_plan(size, seed,
        per_shard)[rank::world]``, so the parts of all ranks make the ``world=1`` sample and no shard is read by
        two ranks.

        A slot of ``q`` pairs takes a uniform sample of ``q`` valid pairs of its first shard: every raw sample gets
        a priority drawn with ``default_rng([*seed, shard])``, the ``q + q // 8 + 2`` lowest are kept undecoded
        while the shard streams by, and they are decoded in priority order until ``q`` decode (the spare ones stand
        in for bad samples). A shard that gives fewer (a small, damaged or mostly bad shard) leaves the rest to the
        next shard of the chain, and so on; a chain that runs out gives fewer pairs. Bad samples and read errors
        are left out, not reported: the scoring pass reports them. Each pair has ``"shard"`` (its shard's index in
        :attr:`urls`) and ``"position"`` (its place among the shard's samples).
        """
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"Need 0 <= rank < world, got rank={rank}, world={world}.")
        seeds = [int(s) for s in np.atleast_1d(np.asarray(seed, dtype=np.int64))]
        for quota, chain in self.sample_plan(size, seed, per_shard)[rank::world]:
            left = quota
            for shard in chain:
                if left == 0:
                    break
                for position, pair in self._sample_shard(self.urls[shard], left, [*seeds, shard]):
                    yield {**pair, "shard": shard, "position": position}
                    left = None if left is None else left - 1

    def _sample_shard(self, url: str, quota: int | None, seed: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, pair)`` of ``quota`` uniformly drawn valid pairs of one shard (None: all, in order)."""
        raw_samples = iter_raw_samples(url, ShardReport(url), self.uid_field)  # a read error ends the shard
        if quota is None:
            for position, (_, raw) in enumerate(raw_samples):
                pair = self.decode(raw) if self.selected(raw) else None
                if pair is not None:
                    yield position, pair
            return
        keep, rng = quota + quota // 8 + 2, np.random.default_rng(seed)
        kept: list[tuple[float, int, dict[str, bytes]]] = []  # min-heap of -priority: the `keep` lowest priorities
        priorities = np.empty(0)
        for position, (_, raw) in enumerate(raw_samples):
            if position % 1024 == 0:
                priorities = rng.random(1024)
            item = (-float(priorities[position % 1024]), position, raw)
            if not self.selected(raw):
                continue
            if len(kept) < keep:
                heapq.heappush(kept, item)
            elif item[:2] > kept[0][:2]:
                heapq.heapreplace(kept, item)
        taken = 0
        for _, position, raw in sorted(kept, key=lambda item: item[:2], reverse=True):  # lowest priority first
            if taken == quota:
                break
            pair = self.decode(raw)
            if pair is not None:
                taken += 1
                yield position, pair

    def sample_batches(self, size: int | None, seed: int | Sequence[int], batch_size: int,
                       collate: Callable[[list], Any], *, rank: int = 0, world: int = 1,
                       per_shard: int = SAMPLE_PER_SHARD) -> Iterator[Any]:  # fmt: skip
        """:meth:`sample_pairs` collated in batches of ``batch_size``: rank ``rank``'s part of the pool sample a
        scorer is prepared on (``size=None``: every pair). The parts of all ranks make the same sample whatever
        ``world``; the total read is the shards of :meth:`sample_plan`, each once."""
        chunk: list[dict[str, Any]] = []
        for pair in self.sample_pairs(size, seed, rank=rank, world=world, per_shard=per_shard):
            chunk.append(pair)
            if len(chunk) == batch_size:
                yield collate(chunk)
                chunk = []
        if chunk:
            yield collate(chunk)

    def selected(self, raw: dict[str, bytes]) -> bool:
        """Whether a raw sample's uid is in the selection (always True without one; False without a uid)."""
        if self.selection is None:
            return True
        uid = read_uid(raw.get("json"), self.uid_field)
        return not isinstance(uid, Reason) and _contains(self.selection, id_key(uid))

    def uid(self, raw: dict[str, bytes]) -> int | str | None:
        """A raw sample's uid (``uid_field`` of its json), or None when it gives none."""
        return known_uid(read_uid(raw.get("json"), self.uid_field))

    def decode_or_reason(self, raw: dict[str, bytes]) -> dict[str, Any] | str:
        """Decode one raw sample with this pool's transform, or return the reason it is unusable."""
        return decode_pair(raw, self.transform, uid_field=self.uid_field, image_extensions=self.image_extensions)

    def decode(self, raw: dict[str, bytes]) -> dict[str, Any] | None:
        """Decode one raw sample with this pool's transform; None when it is unusable."""
        pair = decode_pair(raw, self.transform, uid_field=self.uid_field, image_extensions=self.image_extensions)
        return None if isinstance(pair, str) else pair

    def with_selection(self, ids: np.ndarray | None) -> WebDatasetPairs:
        """A copy that keeps only ``ids`` (the dataset of one selection round)."""
        import copy

        clone = copy.copy(self)
        clone.selection = None if ids is None else np.unique(id_keys(ids))
        return clone

    def __repr__(self) -> str:
        return f"WebDatasetPairs({len(self.urls)} shards, rank {self.rank}/{self.world_size})"


def _apportion(total: int, weights: Sequence[int]) -> np.ndarray:
    """``total`` split in proportion to ``weights`` (largest remainders, ties to the first)."""
    exact = total * np.asarray(weights, dtype=np.float64) / float(sum(weights))
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(shares - exact, kind="stable")[: total - int(shares.sum())]] += 1
    return shares


def _contains(sorted_ids: np.ndarray, uid: int) -> bool:
    pos = int(np.searchsorted(sorted_ids, uid))
    return pos < len(sorted_ids) and int(sorted_ids[pos]) == uid
