"""A built-in, download-free image-caption dataset with a *general* and a *target* domain.

One module because it is one dataset: its procedural renderer, captions, noise and splits are all defined here.

Data selection for CLIP continual pre-training (CHIPS and its baselines) needs three things that are awkward to get
without the internet: a large, mixed "pool" of image-caption pairs to select from, a small "target" set describing the
domain we want to adapt to, and a zero-shot benchmark (class names + prompt templates) that measures whether the
selection helped. :class:`TwoDomainPairs` provides all three procedurally:

* **general** domain ("clip art"): flat-coloured geometric shapes (circle, square, triangle, ...) on a light,
  slightly noisy background, with captions such as ``"a large red circle at the top"``.
* **target** domain ("fluorescence micrographs"): soft, glowing cell-like structures tinted in a stain colour on a
  dark, noisy background, with microscopy captions such as
  ``"fluorescence micrograph of a spindle cell stained with green dye, 40x"``.

The two domains differ strongly in pixel statistics (the target domain is much darker) and share almost no caption
vocabulary, so a selection method that prefers target-like pool samples has something real to find. Everything is
deterministic: metadata comes from a numpy generator seeded from ``(seed, split)`` and each image is rendered from its
own generator seeded from ``(seed, split, index)``, so ``__getitem__`` does not depend on access order or on the
DataLoader worker that calls it.

Example::

    >>> from lightning_chips.data.builtin import CLASSNAMES, TEMPLATES, TwoDomainPairs
    >>> pool = TwoDomainPairs(1000, target_fraction=0.2, noise_fraction=0.1, seed=0)
    >>> sample = pool[0]
    >>> sample["image"].shape, sample["image"].dtype
    (torch.Size([3, 32, 32]), torch.float32)
    >>> int(pool.domains.sum()), int(pool.noisy.sum())
    (200, 100)
    >>> target = TwoDomainPairs(200, target_fraction=1.0, split="val")  # selection target / zero-shot eval set
    >>> prompts = [t.format(c) for c in CLASSNAMES["target"] for t in TEMPLATES["target"]]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
import torch

from lightning_chips.data.labelled import LabelledPairs
from lightning_chips.data.validation import check_fraction, check_int, fix_articles, readonly

__all__ = [
    "CLASSNAMES",
    "DOMAINS",
    "SPLIT_ID_OFFSETS",
    "TEMPLATES",
    "TwoDomainPairs",
]

DOMAINS: tuple[str, str] = ("general", "target")
"""Domain names; ``TwoDomainPairs.domains`` holds their indices (0 = general, 1 = target)."""

CLASSNAMES: dict[str, tuple[str, ...]] = {
    "general": ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "crescent", "heart", "arrow"),
    "target": (
        "round cell",
        "spindle cell",
        "dividing cell",
        "cell cluster",
        "hollow cell",
        "spiky cell",
        "nucleated cell",
        "filament network",
        "granular cell",
        "sickle cell",
    ),
}
"""Ten class names per domain, exactly the words used in the captions; ``labels`` index into these tuples."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "general": (
        "a drawing of a {}.",
        "clip art of a {}.",
        "a simple icon of a {}.",
        "a flat illustration of a {}.",
        "a {} shape on a plain background.",
    ),
    "target": (
        "a fluorescence micrograph of a {}.",
        "a microscopy image of a {}.",
        "a confocal image of a {}.",
        "a stained {} under a fluorescence microscope.",
    ),
}
"""Zero-shot prompt templates per domain (``str.format`` strings with one ``{}`` for the class name)."""

SPLIT_ID_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
"""Sample ids are ``SPLIT_ID_OFFSETS[split] + index``, so ids of different splits never collide."""

_SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_MAX_SAMPLES = 1_000_000_000
_TAG_META = 0x4D455441  # distinct SeedSequence prefixes for metadata and per-image generators
_TAG_IMAGE = 0x494D4147
_NUM_CLASSES = 10

# --- general-domain vocabulary -----------------------------------------------------------------------------------
_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.86, 0.12, 0.12)),
    ("orange", (0.98, 0.55, 0.05)),
    ("green", (0.10, 0.62, 0.20)),
    ("blue", (0.12, 0.30, 0.85)),
    ("purple", (0.50, 0.20, 0.70)),
    ("pink", (0.95, 0.45, 0.70)),
    ("brown", (0.50, 0.30, 0.12)),
    ("black", (0.08, 0.08, 0.08)),
)
_SIZES: tuple[tuple[str, float], ...] = (("small", 0.33), ("large", 0.55))
# (word, phrase, unit direction); image rows grow downwards, so "top" is negative y.
_POSITIONS: tuple[tuple[str, str, tuple[float, float]], ...] = (
    ("center", "in the center", (0.0, 0.0)),
    ("left", "on the left", (-1.0, 0.0)),
    ("right", "on the right", (1.0, 0.0)),
    ("top", "at the top", (0.0, -1.0)),
    ("bottom", "at the bottom", (0.0, 1.0)),
)
_GENERAL_CAPTIONS: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "clip art of a {colour} {shape} on a plain background",
    "{size} {colour} {shape}, {pos}",
    "a drawing of a {size} {colour} {shape} {where}",
    "simple {colour} {shape} icon {where}",
    "flat illustration of a {size} {shape} in {colour}",
)

# --- target-domain vocabulary ------------------------------------------------------------------------------------
_STAINS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("green", (0.15, 1.00, 0.25)),
    ("red", (1.00, 0.20, 0.15)),
    ("blue", (0.25, 0.45, 1.00)),
    ("magenta", (1.00, 0.20, 0.90)),
    ("cyan", (0.10, 0.90, 1.00)),
)
_MAGNIFICATIONS: tuple[tuple[str, float], ...] = (("20x", 0.38), ("40x", 0.50), ("63x", 0.62))
_TARGET_CAPTIONS: tuple[str, ...] = (
    "fluorescence micrograph of a {shape} stained with {stain} dye, {mag}",
    "microscopy image showing a {shape}, {stain} stain",
    "a {shape} imaged at {mag} magnification, {stain} fluorescence",
    "confocal image of a {shape} labelled with {stain} fluorophore",
    "{stain} fluorescent stain, {shape}, {mag} objective",
    "widefield fluorescence microscopy of a {shape} ({stain} channel, {mag})",
)


# --- rendering helpers -------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)`` of an ``n x n`` grid spanning ``[-1, 1]`` (y grows downwards)."""
    c = (np.arange(n, dtype=np.float64) + 0.5) * (2.0 / n) - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _supersampling(image_size: int) -> int:
    return max(2, min(4, math.ceil(96 / image_size)))


def _local(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, angle: float) -> tuple[np.ndarray, ...]:
    """Coordinates relative to an object centred at ``(cx, cy)``, scaled by ``1 / r`` and rotated by ``-angle``."""
    dx = (x - cx) / r
    dy = (y - cy) / r
    ca, sa = math.cos(angle), math.sin(angle)
    return ca * dx + sa * dy, -sa * dx + ca * dy


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float, phase: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        phi = phase + 2.0 * math.pi * k / sides
        inside &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return inside


def _general_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of general-domain shape ``label`` in local coordinates (object radius ~1)."""
    if label == 0:  # circle
        return u * u + v * v <= 1.0
    if label == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if label == 2:  # triangle, pointing up
        return _polygon(u, v - 0.12, 3, 0.55, math.pi / 2)
    if label == 3:  # cross (plus sign)
        au, av = np.abs(u), np.abs(v)
        return ((au <= 1.0) & (av <= 0.3)) | ((au <= 0.3) & (av <= 1.0))
    if label == 4:  # ring
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.36)
    if label == 5:  # diamond (tall rhombus)
        return np.abs(u) / 0.65 + np.abs(v) <= 1.0
    if label == 6:  # five-pointed star
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        return rho <= 0.42 + 0.63 * ((1.0 + np.cos(5.0 * (theta + math.pi / 2))) * 0.5) ** 2
    if label == 7:  # crescent opening to the right
        return (u * u + v * v <= 1.0) & ((u - 0.42) ** 2 + v * v > 0.64)
    if label == 8:  # heart
        hx, hy = u * 1.15, -v * 1.15 + 0.15
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0.0
    # arrow pointing right
    shaft = (u >= -1.0) & (u <= 0.1) & (np.abs(v) <= 0.24)
    head = (u >= 0.1) & (u <= 1.0) & (np.abs(v) <= 0.75 * (1.0 - u) / 0.9)
    return shaft | head


def _soft(d: np.ndarray, w: float) -> np.ndarray:
    """Smooth inside indicator of a signed distance ``d`` (negative inside) with edge width ``w``."""
    return 0.5 - 0.5 * np.tanh(d / (2.0 * w))


def _target_field(
    label: int, u: np.ndarray, v: np.ndarray, x: np.ndarray, y: np.ndarray, r: float, w: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stain intensity (and an optional counterstain intensity) of target-domain morphology ``label``."""
    rho = np.hypot(u, v)

    def glow(d: np.ndarray) -> np.ndarray:
        return 0.85 * _soft(d, w) + 0.15 * _soft(d, 3.5 * w)

    if label == 0:  # round cell, slightly brighter in the middle
        return glow(rho - 1.0) * (0.75 + 0.25 * np.clip(1.0 - rho * rho, 0.0, 1.0)), None
    if label == 1:  # spindle cell: elongated ellipse
        a, b = 1.3, 0.36
        return glow((np.hypot(u / a, v / b) - 1.0) * b), None
    if label == 2:  # dividing cell: two touching blobs
        d = np.minimum(np.hypot(u - 0.55, v), np.hypot(u + 0.55, v)) - 0.58
        return glow(d), None
    if label == 3:  # cell cluster: several small blobs
        k = int(rng.integers(4, 7))
        ang = rng.uniform(0.0, 2.0 * math.pi, k)
        rad = 0.75 * np.sqrt(rng.uniform(0.0, 1.0, k))
        rads = rng.uniform(0.28, 0.38, k)
        d = np.full(u.shape, np.inf)
        for i in range(k):
            d = np.minimum(d, np.hypot(u - rad[i] * math.cos(ang[i]), v - rad[i] * math.sin(ang[i])) - rads[i])
        return glow(d), None
    if label == 4:  # hollow cell: bright rim, dark interior
        return glow(np.abs(rho - 0.8) - 0.17), None
    if label == 5:  # spiky cell: body with radial spikes
        n = int(rng.integers(7, 11))
        theta = np.arctan2(v, u)
        boundary = 0.45 + 0.62 * ((1.0 + np.cos(n * theta)) * 0.5) ** 6
        return glow(rho - boundary), None
    if label == 6:  # nucleated cell: bright body, dark nucleus carrying a counterstain
        body = glow(rho - 1.0)
        nucleus = _soft(np.hypot(u - 0.25, v) - 0.42, w)
        return body * (1.0 - 0.85 * nucleus), 0.8 * nucleus
    if label == 7:  # filament network: lines across the whole field of view
        k = int(rng.integers(3, 6))
        width = 0.12 * r
        d = np.full(x.shape, np.inf)
        for _ in range(k):
            phi = rng.uniform(0.0, math.pi)
            px, py = rng.uniform(-0.6, 0.6, 2)
            d = np.minimum(d, np.abs((x - px) * math.sin(phi) - (y - py) * math.cos(phi)))
        return glow((d - width) / r), None
    if label == 8:  # granular cell: faint body filled with bright dots
        k = int(rng.integers(10, 19))
        ang = rng.uniform(0.0, 2.0 * math.pi, k)
        rad = 0.85 * np.sqrt(rng.uniform(0.0, 1.0, k))
        d = np.full(u.shape, np.inf)
        for i in range(k):
            d = np.minimum(d, np.hypot(u - rad[i] * math.cos(ang[i]), v - rad[i] * math.sin(ang[i])))
        dots = _soft(d - 0.14, 0.5 * w)
        return np.maximum(0.25 * glow(rho - 1.0), dots), None
    # sickle cell: crescent
    d = np.maximum(rho - 1.0, 0.95 - np.hypot(u - 0.7, v))
    return glow(d), None


class TwoDomainPairs(LabelledPairs):
    """Deterministic, procedurally rendered image-caption pairs from a *general* and a *target* domain.

    Nothing is downloaded or read from disk. The metadata of all samples (domain, class, caption attributes, caption,
    noise) is computed at construction, which takes well under a second for 20k samples; images are rendered on the
    fly in ``__getitem__`` from a per-sample generator (about a millisecond or less per 32x32 image).

    **General domain** (``domain == 0``, "clip art"): one flat-coloured shape (:data:`CLASSNAMES` ``["general"]``:
    circle, square, triangle, cross, ring, diamond, star, crescent, heart, arrow) on a light, slightly noisy
    background. Per sample: colour (red, orange, green, blue, purple, pink, brown, black), size (small / large),
    position (center / left / right / top / bottom, jittered) and a slight rotation. Captions combine these words in
    several templates, e.g. ``"a large red circle at the top"`` or ``"small green star, center"``.

    **Target domain** (``domain == 1``, "fluorescence micrographs"): soft, glowing structures
    (:data:`CLASSNAMES` ``["target"]``: round cell, spindle cell, dividing cell, cell cluster, hollow cell, spiky cell,
    nucleated cell, filament network, granular cell, sickle cell) tinted in a stain colour (green, red, blue, magenta,
    cyan) on a dark background with sensor noise; the magnification (20x / 40x / 63x) sets the object size. Captions
    use microscopy vocabulary, e.g. ``"fluorescence micrograph of a spindle cell stained with green dye, 40x"``.
    Target images are much darker than general ones on average.

    **Knobs.** ``target_fraction`` puts exactly ``round(target_fraction * num_samples)`` target-domain samples at
    seeded-random positions (``1.0``: a target-only set, e.g. the selection target or a zero-shot evaluation set;
    ``0.0``: general only). ``noise_fraction`` gives exactly ``round(noise_fraction * num_samples)`` seeded-random
    samples the caption of another sample with a different ``(domain, class)``; they are flagged in :attr:`noisy`, and
    :meth:`clean_caption` still returns the true caption. Class labels are uniform per domain.

    **Determinism.** The same ``(num_samples, target_fraction, noise_fraction, image_size, split, seed)`` yields
    bit-identical images, captions, labels and ids; a different ``seed`` or ``split`` yields different samples.
    Changing only ``noise_fraction`` keeps labels, domains, clean captions and images unchanged.

    Args:
        num_samples: Number of pairs ``N`` (1 to 1e9).
        target_fraction: Fraction of target-domain samples, in ``[0, 1]``.
        noise_fraction: Fraction of samples with a mismatched caption, in ``[0, 1]``.
        image_size: Side length of the square images in pixels (>= 8).
        split: ``"train"``, ``"val"`` or ``"test"``; selects the seed stream and the id offset
            (see :data:`SPLIT_ID_OFFSETS`).
        seed: Non-negative integer seed.
        tokenizer: Optional callable mapping a list of captions to a tensor of token ids (e.g. an ``open_clip``
            tokenizer); if given, ``sample["text"]`` is ``tokenizer([caption])[0]``, otherwise the caption string.
        transform: Optional callable applied to the ``[3, S, S]`` float image in ``[0, 1]``.

    Attributes:
        ids: ``int64`` array of stable sample ids, ``SPLIT_ID_OFFSETS[split] + arange(N)`` (read-only).
        labels: ``int64`` array of class indices within each sample's domain (read-only).
        domains: ``int64`` array of domain indices, 0 = general, 1 = target (read-only).
        noisy: ``bool`` array marking samples whose caption was replaced (read-only).
        caption_domains: ``int64`` array, the domain the returned caption describes (read-only).
        caption_labels: ``int64`` array, the class the returned caption describes (read-only).
        captions: The caption returned for each sample (the mismatched one for noisy samples).

    Raises:
        ValueError: If an argument is out of range; the message says what to pass.

    Example::

        >>> import open_clip
        >>> from lightning_chips.data.builtin import TwoDomainPairs
        >>> tokenizer = open_clip.get_tokenizer("ViT-B-32")
        >>> pool = TwoDomainPairs(20000, target_fraction=0.1, noise_fraction=0.2, tokenizer=tokenizer)
        >>> sample = pool[3]
        >>> sorted(sample)
        ['domain', 'id', 'image', 'label', 'noisy', 'text']
        >>> pool.captions[3] == pool.clean_caption(3) or bool(pool.noisy[3])
        True
        >>> target = TwoDomainPairs(500, target_fraction=1.0, split="val")
        >>> TwoDomainPairs.classnames("target")[:2]
        ('round cell', 'spindle cell')
    """

    group_labels: ClassVar[dict[str, tuple[str, ...]]] = {"domain": DOMAINS}
    """Names of the ``domain`` values (0 = general, 1 = target), used when a selection is reported by domain."""

    def __init__(
        self,
        num_samples: int = 20000,
        *,
        target_fraction: float = 0.2,
        noise_fraction: float = 0.0,
        image_size: int = 32,
        split: Literal["train", "val", "test"] = "train",
        seed: int = 0,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.num_samples: int = check_int("num_samples", num_samples, 1, _MAX_SAMPLES, "e.g. num_samples=20000")
        self.target_fraction: float = check_fraction("target_fraction", target_fraction)
        self.noise_fraction: float = check_fraction("noise_fraction", noise_fraction)
        self.image_size: int = check_int("image_size", image_size, 8, None, "e.g. image_size=32")
        if not isinstance(split, str) or split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of 'train', 'val' or 'test', got {split!r}.")
        self.split: str = split
        self.seed: int = check_int("seed", seed, 0, None, "e.g. seed=0")
        self.set_callables(tokenizer, transform)
        self.id_offset: int = SPLIT_ID_OFFSETS[split]
        self._split_code = _SPLIT_CODES[split]
        self._build_metadata()

    # ------------------------------------------------------------------------------------------------------------
    # public helpers
    @staticmethod
    def classnames(domain: str) -> tuple[str, ...]:
        """The ten class names of ``domain`` (``"general"`` or ``"target"``), as used in captions and prompts."""
        return CLASSNAMES[_check_domain(domain)]

    @staticmethod
    def templates(domain: str) -> tuple[str, ...]:
        """Zero-shot prompt templates of ``domain`` (``str.format`` strings with one ``{}``)."""
        return TEMPLATES[_check_domain(domain)]

    def clean_caption(self, index: int) -> str:
        """The true caption of sample ``index`` (equal to ``captions[index]`` unless the sample is noisy)."""
        return self._clean_captions[self._index(index)]

    def load_image(self, index: int) -> torch.Tensor:
        """The image of sample ``index`` (:meth:`render`)."""
        return self.render(index)

    def render(self, index: int) -> torch.Tensor:
        """Render sample ``index`` as a float32 ``[3, S, S]`` tensor in ``[0, 1]`` (before ``transform``)."""
        i = self._index(index)
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_IMAGE, self.seed, self._split_code, i]))
        if self.domains[i] == 0:
            array = self._render_general(i, rng)
        else:
            array = self._render_target(i, rng)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, target_fraction={self.target_fraction}, "
            f"noise_fraction={self.noise_fraction}, image_size={self.image_size}, split={self.split!r}, "
            f"seed={self.seed})"
        )

    # ------------------------------------------------------------------------------------------------------------
    # internals
    def _build_metadata(self) -> None:
        n = self.num_samples
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_META, self.seed, self._split_code]))
        # Fixed draw order: domains, labels, attributes, templates, then noise (so noise leaves the rest unchanged).
        n_target = round(self.target_fraction * n)
        domains = np.zeros(n, dtype=np.int64)
        domains[rng.permutation(n)[:n_target]] = 1
        labels = rng.integers(0, _NUM_CLASSES, n, dtype=np.int64)
        colour = rng.integers(0, len(_COLOURS), n)
        size = rng.integers(0, len(_SIZES), n)
        position = rng.integers(0, len(_POSITIONS), n)
        stain = rng.integers(0, len(_STAINS), n)
        mag = rng.integers(0, len(_MAGNIFICATIONS), n)
        template = rng.integers(0, len(_GENERAL_CAPTIONS) * len(_TARGET_CAPTIONS), n)

        clean: list[str] = []
        general_names, target_names = CLASSNAMES["general"], CLASSNAMES["target"]
        for i in range(n):
            if domains[i] == 0:
                pos = _POSITIONS[position[i]]
                text = _GENERAL_CAPTIONS[template[i] % len(_GENERAL_CAPTIONS)].format(
                    shape=general_names[labels[i]],
                    colour=_COLOURS[colour[i]][0],
                    size=_SIZES[size[i]][0],
                    pos=pos[0],
                    where=pos[1],
                )
            else:
                text = _TARGET_CAPTIONS[template[i] % len(_TARGET_CAPTIONS)].format(
                    shape=target_names[labels[i]], stain=_STAINS[stain[i]][0], mag=_MAGNIFICATIONS[mag[i]][0]
                )
            clean.append(fix_articles(text))

        n_noisy = round(self.noise_fraction * n)
        noisy = np.zeros(n, dtype=bool)
        noisy_idx = np.sort(rng.choice(n, size=n_noisy, replace=False)) if n_noisy else np.zeros(0, dtype=np.int64)
        noisy[noisy_idx] = True
        captions = list(clean)
        caption_domains = domains.copy()
        caption_labels = labels.copy()
        keys = domains * _NUM_CLASSES + labels
        for key in np.unique(keys[noisy_idx]):
            members = noisy_idx[keys[noisy_idx] == key]
            candidates = np.flatnonzero(keys != key)
            if len(candidates) > 0:
                donors = candidates[rng.integers(0, len(candidates), len(members))]
                for i, j in zip(members.tolist(), donors.tolist(), strict=True):
                    captions[i] = clean[j]
                    caption_domains[i] = domains[j]
                    caption_labels[i] = labels[j]
            else:  # every sample shares this (domain, class): describe another class of the same domain instead
                for i in members.tolist():
                    names = CLASSNAMES[DOMAINS[domains[i]]]
                    other = int((labels[i] + rng.integers(1, _NUM_CLASSES)) % _NUM_CLASSES)
                    captions[i] = fix_articles(clean[i].replace(names[labels[i]], names[other]))
                    caption_labels[i] = other

        self.ids: np.ndarray = readonly(self.id_offset + np.arange(n, dtype=np.int64))
        self.labels: np.ndarray = readonly(labels)
        self.domains: np.ndarray = readonly(domains)
        self.noisy: np.ndarray = readonly(noisy)
        self.caption_domains: np.ndarray = readonly(caption_domains)
        self.caption_labels: np.ndarray = readonly(caption_labels)
        self.captions: list[str] = captions
        self._clean_captions: list[str] = clean
        self._colour = colour
        self._size = size
        self._position = position
        self._stain = stain
        self._mag = mag

    def _render_general(self, i: int, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        ss = _supersampling(s)
        x, y = _grid(s * ss)
        label = int(self.labels[i])
        r = _SIZES[self._size[i]][1] * rng.uniform(0.92, 1.08)
        direction = _POSITIONS[self._position[i]][2]
        offset = min(0.45, 0.92 - r)
        cx = direction[0] * offset + rng.uniform(-0.05, 0.05)
        cy = direction[1] * offset + rng.uniform(-0.05, 0.05)
        angle = rng.uniform(-0.35, 0.35)  # about +-20 degrees
        u, v = _local(x, y, cx, cy, r, angle)
        coverage = _general_mask(label, u, v).reshape(s, ss, s, ss).mean(axis=(1, 3))

        background = np.clip(rng.uniform(0.9, 1.0) + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0)
        colour = np.clip(np.asarray(_COLOURS[self._colour[i]][1]) + rng.uniform(-0.04, 0.04, 3), 0.0, 1.0)
        image = background[:, None, None] + (colour - background)[:, None, None] * coverage[None]
        image += rng.normal(0.0, 0.015, image.shape)
        return np.clip(image, 0.0, 1.0)

    def _render_target(self, i: int, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        x, y = _grid(s)
        label = int(self.labels[i])
        r = _MAGNIFICATIONS[self._mag[i]][1] * rng.uniform(0.9, 1.1)
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        u, v = _local(x, y, cx, cy, r, angle)
        w = 0.06 + 0.5 * (2.0 / s) / r  # intrinsic blur plus about half a pixel, in object units
        stain_name = _STAINS[self._stain[i]][0]
        intensity, counter = _target_field(label, u, v, x, y, r, w, rng)

        stain = np.clip(np.asarray(_STAINS[self._stain[i]][1]) + rng.uniform(-0.05, 0.05, 3), 0.0, 1.0)
        gain = rng.uniform(0.7, 1.0)
        signal = gain * stain[:, None, None] * intensity[None]
        if counter is not None:
            tint = (1.0, 0.55, 0.1) if stain_name in ("blue", "cyan") else (0.3, 0.4, 1.0)
            signal = signal + gain * np.asarray(tint)[:, None, None] * counter[None]
        background = rng.uniform(0.01, 0.05)
        noise_std = rng.uniform(0.015, 0.035)
        noise = rng.normal(0.0, 1.0, signal.shape) * (noise_std + 0.04 * np.sqrt(np.clip(signal, 0.0, None)))
        return np.clip(background + signal + noise, 0.0, 1.0)


# --- argument validation -----------------------------------------------------------------------------------------


def _check_domain(domain: str) -> str:
    if domain not in CLASSNAMES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}.")
    return domain
