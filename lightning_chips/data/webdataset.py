"""WebDataset pools: image-caption tar shards read as ``{"image", "text", "id"}`` pairs, bad samples counted.

One module because it is one thing: how a shard becomes pairs (expanding shard specs, reading members, decoding,
checking, reporting), used by every reader of shards (streaming CPT, ``score``, targets).

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
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from lightning_chips.data.checks import (
    BadSample,
    SkippedSample,
    decode_caption,
    decode_image,
    describe_error,
    parse_id,
)
from lightning_chips.data.subset import PairCollate
from lightning_chips.ids import id_key, id_keys

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
    "image_transform",
    "iter_raw_samples",
]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
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
    uid = _parse_uid(raw.get("json"), uid_field)
    if isinstance(uid, Reason):
        return str(uid)
    meta = json.loads(raw["json"])  # parsed once more: _parse_uid succeeded, so it is a dict
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
    """Why a sample is unusable (what :func:`_parse_uid` returns instead of a uid, which may itself be a string)."""


def _parse_uid(data: bytes | None, uid_field: str) -> int | str | Reason:
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


def _known(uid: int | str | Reason) -> int | str | None:
    return None if isinstance(uid, Reason) else uid


def _split_member(name: str) -> tuple[str, str] | None:
    """``dir/KEY.EXT.EXT2`` -> ``("dir/KEY", "ext.ext2")`` (WebDataset's rule: the key ends at the first dot of
    the file name)."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    key, ext = base.split(".", 1)
    return (f"{head}/{key}" if head else key), ext.lower()


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
                split = _split_member(info.name)
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
            report.skip(key, "cut off by the shard's read error", _known(_parse_uid(members.get("json"), uid_field)))


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
                report.skip(key, pair, _known(_parse_uid(raw.get("json"), self.uid_field)))
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
        uid = _parse_uid(raw.get("json"), self.uid_field)
        return not isinstance(uid, Reason) and _contains(self.selection, id_key(uid))

    def uid(self, raw: dict[str, bytes]) -> int | str | None:
        """A raw sample's uid (``uid_field`` of its json), or None when it gives none."""
        return _known(_parse_uid(raw.get("json"), self.uid_field))

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


class ShardCollate(PairCollate):
    """:class:`PairCollate` that passes :class:`ShardReport` items through as ``batch["reports"]``.

    A batch may hold only reports (e.g. a shard with no valid pair); its ``"id"`` is then empty.
    """

    def __call__(self, items: Sequence[dict[str, Any] | ShardReport]) -> dict[str, Any]:  # type: ignore[override]
        reports = [item for item in items if isinstance(item, ShardReport)]
        pairs = [item for item in items if not isinstance(item, ShardReport)]
        batch = super().__call__(pairs) if pairs else {"id": torch.empty(0, dtype=torch.int64)}
        batch["reports"] = reports
        return batch


class ImageCaptionFolder(torch.utils.data.Dataset):
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
            split = _split_member(name)
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
            return _parse_uid(f.read(), self.uid_field)

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
