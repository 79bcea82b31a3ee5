"""Galleries of a selection round: the top-k and bottom-k pairs by score and the pairs that entered and left the
selection, as thumbnails with caption, id and score.

:func:`pick_gallery` chooses the pairs from a round's scores and selections (one function per decision:
:func:`score_order` ranks, :func:`top_rows`, :func:`bottom_rows`, :func:`entered_rows`, :func:`left_rows` pick;
``lightning-chips report`` picks with them too); :func:`load_pairs` reads them back through the pool's
:meth:`~lightning_chips.data.pool.PairSource.load_pairs` (a map-style dataset by index, WebDataset shards by uid,
only the shards that hold them when their pool positions are known);
:func:`write_gallery` stores them in ``round_{r:04d}_gallery.npz`` beside the round file (what ``lightning-chips
report`` shows); :func:`render_grid` draws one gallery as an image for the trainer's loggers, and
:func:`histogram_image` the round's score histogram for loggers without a native histogram.

A gallery file holds ``ids`` [M] (as given: int64 or str), ``kinds`` [M] (``"top"``, ``"bottom"``,
``"entered"``, ``"left"``), ``scores`` float32 [M], ``captions`` [M], ``thumbnails`` uint8 [M, S, S, 3], and
``missing_ids`` / ``missing_reasons`` for the pairs that could not be loaded.

Example::

    >>> import numpy as np
    >>> picked = pick_gallery(np.arange(6), np.array([.1, .9, .5, .3, .8, .2]), np.array([0, 1, 1, 0, 1, 0], bool),
    ...                       previous=np.array([1, 1, 0, 0, 1, 0], bool), k=2)
    >>> {kind: rows.tolist() for kind, rows in picked.items()}
    {'top': [1, 4], 'bottom': [0, 5], 'entered': [2], 'left': [0]}
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_chips.ids import Id
from lightning_chips.io import atomic_savez, atomic_writer
from lightning_chips.ranking import score_order

__all__ = [
    "KINDS",
    "GalleryPair",
    "fetch_shard_pairs",
    "gallery_path",
    "histogram_image",
    "gallery_pairs",
    "load_pairs",
    "log_histogram",
    "log_image",
    "log_round_images",
    "pick_gallery",
    "png_bytes",
    "bottom_rows",
    "entered_rows",
    "left_rows",
    "render_grid",
    "score_order",
    "top_rows",
    "thumbnail",
    "write_gallery",
]

KINDS = ("top", "bottom", "entered", "left")


@dataclass
class GalleryPair:
    """One pair of a gallery: its id as given, kind, score, caption and thumbnail (None when it failed to load,
    with the reason in ``missing``)."""

    id: Id
    kind: str
    score: float
    caption: str = ""
    image: np.ndarray | None = None
    missing: str = ""


def gallery_path(round_file: str | os.PathLike) -> Path:
    """``round_0003.npz`` -> ``round_0003_gallery.npz``."""
    path = Path(round_file)
    return path.with_name(f"{path.stem}_gallery.npz")


def top_rows(order: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scored rows of a :func:`score_order`."""
    return order[:k]


def bottom_rows(order: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` lowest-scored rows of a :func:`score_order`, lowest first."""
    return order[::-1][:k]


def entered_rows(order: np.ndarray, selected: np.ndarray, previous: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scored rows selected now and not in ``previous`` (masks over the rows)."""
    return order[(np.asarray(selected, bool) & ~np.asarray(previous, bool))[order]][:k]


def left_rows(order: np.ndarray, selected: np.ndarray, previous: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` lowest-scored rows in ``previous`` and not selected now (masks over the rows), lowest first."""
    lowest = order[::-1]
    return lowest[(np.asarray(previous, bool) & ~np.asarray(selected, bool))[lowest]][:k]


def pick_gallery(ids: np.ndarray, scores: np.ndarray, selected: np.ndarray, previous: np.ndarray | None,
                 k: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Rows of each gallery: ``top`` (k highest scores), ``bottom`` (k lowest), ``entered`` (selected now and not in
    ``previous``: the k highest-scored), ``left`` (in ``previous`` and not now: the k lowest-scored); ties as
    :func:`score_order` breaks them. No ``entered`` / ``left`` without a previous round."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    order = score_order(ids, scores)
    picked = {"top": top_rows(order, k), "bottom": bottom_rows(order, k)}
    if previous is not None:
        picked["entered"] = entered_rows(order, selected, previous, k)
        picked["left"] = left_rows(order, selected, previous, k)
    return picked


def thumbnail(image: Any, size: int) -> np.ndarray:
    """``[size, size, 3]`` uint8 RGB of an image: PIL, uint8 ``[3, H, W]`` / ``[H, W, 3]``, or float ``[3, H, W]``
    in [0, 1] (a normalised tensor is stretched to its own min-max). Resized on the short side, centre-cropped."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)  # a tensor
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = array[..., None]
        if array.dtype != np.uint8:
            array = array.astype(np.float32)
            low, high = float(array.min()), float(array.max())
            if low < 0.0 or high > 1.0:  # normalised: show its own range
                array = (array - low) / max(high - low, 1e-8)
            array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(array[..., :3]))
    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                           Image.Resampling.BICUBIC)  # fmt: skip
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _caption(text: Any) -> str:
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace").strip()
    if isinstance(text, str):
        return text.strip()
    return "(token ids)"


def fetch_shard_pairs(urls: Sequence[str], wanted: Iterable[Id], *, uid_field: str = "uid",
                      size: int = 64) -> tuple[dict[Id, tuple[np.ndarray, str]], dict[Id, str]]:  # fmt: skip
    """Read ``wanted`` uids back from WebDataset shards: ``(found: uid -> (thumbnail, caption), missing: uid ->
    reason)`` (:func:`~lightning_chips.data.webdataset.find_pairs`, each image thumbnailed as it is decoded)."""
    from PIL import Image

    from lightning_chips.data.webdataset import find_pairs

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return thumbnail(image, size)

    return find_pairs(urls, wanted, uid_field=uid_field, decode=decode)


def load_pairs(
    datamodule: Any, ids: Sequence[Id], indices: Sequence[int] | None, size: int, *, order: Sequence[int] | None = None
) -> tuple[dict[Id, tuple[np.ndarray, str]], dict[Id, str]]:
    """Thumbnails and captions of pool pairs, from the data module's (or pool's)
    :meth:`~lightning_chips.data.pool.PairSource.load_pairs`, given the pairs' pool positions (``order``,
    :attr:`~lightning_chips.engine.RoundScores.order`; default ``indices``, the dataset indices of a map-style pool):
    a shard pool reads only the shards that hold the pairs. A pair that fails to load is missing, with the reason;
    a pool without ``load_pairs`` gives none."""
    from lightning_chips.data.pool import PairSource

    if not isinstance(datamodule, PairSource):
        reason = (f"{type(datamodule).__name__} cannot give pairs back by id: galleries need its "
                  "`load_pairs(ids, order)` (lightning_chips.data.pool.PairSource)")  # fmt: skip
        return {}, dict.fromkeys(ids, reason)
    found: dict[Id, tuple[np.ndarray, str]] = {}
    missing: dict[Id, str] = {}
    loaded = datamodule.load_pairs(list(ids), order if order is not None else indices)
    for uid in ids:
        pair = loaded.get(uid, "not given back by the pool's load_pairs")
        if isinstance(pair, str):
            missing[uid] = pair
            continue
        try:
            found[uid] = (thumbnail(pair[0], size), _caption(pair[1]))
        except Exception as exc:  # an image the pool holds in a form no thumbnail is made of: reported
            missing[uid] = f"failed to load: {type(exc).__name__}: {exc}"
    return found, missing


def write_gallery(path: str | os.PathLike, pairs: Sequence[GalleryPair], size: int) -> Path:
    """Atomically write a round's gallery file (format in the module docstring)."""
    shown = [p for p in pairs if p.image is not None]
    lost = [p for p in pairs if p.image is None]

    def id_array(values: list[Id]) -> np.ndarray:
        return np.array([str(v) for v in values], dtype=str) if any(isinstance(v, str) for v in values) else (
            np.array(values, dtype=np.int64))  # fmt: skip

    atomic_savez(
        path,
        ids=id_array([p.id for p in shown]),
        kinds=np.array([p.kind for p in shown], dtype=str),
        scores=np.array([p.score for p in shown], dtype=np.float32),
        captions=np.array([p.caption for p in shown], dtype=str),
        thumbnails=np.stack([p.image for p in shown]) if shown else np.zeros((0, size, size, 3), np.uint8),
        missing_ids=np.array([str(p.id) for p in lost], dtype=str),
        missing_reasons=np.array([p.missing for p in lost], dtype=str),
    )
    return Path(path)


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _fit(draw: Any, text: str, width: int, font: Any) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_grid(pairs: Sequence[GalleryPair], title: str, columns: int = 8) -> np.ndarray:
    """One gallery as an ``[H, W, 3]`` uint8 image: a title line, then a cell per pair (thumbnail, score, id and
    the caption's start)."""
    from PIL import Image, ImageDraw

    shown = [p for p in pairs if p.image is not None]
    size = shown[0].image.shape[0] if shown else 64  # type: ignore[union-attr]
    cell_w, text_h, title_h = max(size, 120), 40, 20
    columns = max(1, min(columns, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    canvas = Image.new("RGB", (columns * cell_w, title_h + rows * (size + text_h)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((4, 4), _fit(draw, title, canvas.width - 8, font), fill="black", font=font)
    for i, pair in enumerate(shown):
        x, y = (i % columns) * cell_w, title_h + (i // columns) * (size + text_h)
        canvas.paste(Image.fromarray(pair.image), (x + (cell_w - size) // 2, y))
        lines = (f"{pair.score:.4g}  id {pair.id}", pair.caption)
        for j, line in enumerate(lines):
            draw.text((x + 2, y + size + 2 + 13 * j), _fit(draw, line, cell_w - 4, font), fill="black", font=font)
    if not shown:
        draw.text((4, title_h + 4), "(no pair could be loaded)", fill="gray", font=font)
    return np.asarray(canvas, dtype=np.uint8)


def histogram_image(scores: np.ndarray, selected: np.ndarray, title: str, bins: int = 40) -> np.ndarray:
    """The round's score histogram as an ``[H, W, 3]`` uint8 image: selected pairs dark, the rest light, stacked."""
    from PIL import Image, ImageDraw

    scores, selected = np.asarray(scores, dtype=np.float64), np.asarray(selected, bool)
    low, high = float(scores.min()), float(scores.max())
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    chosen = np.histogram(scores[selected], edges)[0]
    rest = np.histogram(scores[~selected], edges)[0]
    width, height, top, bottom = 480, 240, 20, 20
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((4, 4), title, fill="black", font=font)
    tallest = max(int((chosen + rest).max()), 1)
    bar = width / bins
    for b in range(bins):
        h_rest = (height - top - bottom) * rest[b] / tallest
        h_chosen = (height - top - bottom) * chosen[b] / tallest
        x0, base = b * bar, height - bottom
        draw.rectangle((x0, base - h_chosen, x0 + bar - 1, base), fill=(31, 119, 180))
        draw.rectangle((x0, base - h_chosen - h_rest, x0 + bar - 1, base - h_chosen), fill=(174, 199, 232))
    draw.text((4, height - bottom + 4), f"{low:.4g}", fill="black", font=font)
    right = f"{high:.4g}"
    draw.text((width - 4 - draw.textlength(right, font=font), height - bottom + 4), right, fill="black", font=font)
    return np.asarray(canvas, dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an ``[H, W, 3]`` uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def log_image(logger: Any, tag: str, image: np.ndarray, step: int) -> bool:
    """Log an ``[H, W, 3]`` uint8 image through a Lightning logger that supports images (TensorBoard, W&B,
    MLflow, or any logger with a ``log_image(key, images, step)`` method); False when it does not."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        return True
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, key=tag.replace("/", "_"), step=step)
        return True
    if isinstance(logger, WandbLogger) or callable(getattr(logger, "log_image", None)):
        logger.log_image(key=tag, images=[image], step=step)
        return True
    return False


def log_histogram(logger: Any, tag: str, values: np.ndarray, step: int) -> bool:
    """Log a native histogram where the logger has one (TensorBoard); False otherwise."""
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_histogram(tag, torch.as_tensor(np.asarray(values, dtype=np.float32)), global_step=step)
        return True
    return False


def gallery_pairs(
    picked: Mapping[str, np.ndarray],
    given_ids: np.ndarray,
    scores: np.ndarray,
    loaded: Mapping[Id, tuple[np.ndarray, str]],
    missing: Mapping[Id, str],
) -> list[GalleryPair]:
    """The :class:`GalleryPair` s of ``picked`` rows (ids as given) with what :func:`load_pairs` returned."""
    out = []
    for kind, rows in picked.items():
        for row in rows.tolist():
            uid = given_ids[row].item() if hasattr(given_ids[row], "item") else given_ids[row]
            image, caption = loaded.get(uid, (None, ""))
            out.append(GalleryPair(uid, kind, float(scores[row]), caption, image, missing.get(uid, "")))
    return out


def log_round_images(
    loggers: Sequence[Any],
    round_index: int,
    round_file: Path | None,
    datamodule: Any,
    result: Any,
    selected: np.ndarray,
    previous: np.ndarray | None,
    *,
    step: int,
    gallery: int,
    thumbnail_size: int,
) -> None:
    """A round's images (rank 0): the score histogram and, with ``gallery`` > 0, the four galleries, logged to the
    ``loggers`` that take them and written as PNG files beside ``round_file`` for the others; the gallery file
    (:func:`write_gallery`) beside ``round_file`` (None: no files). ``result`` is the round's
    :class:`~lightning_chips.engine.RoundScores`, ``previous`` the last round's selection mask over its ids."""
    from lightning.pytorch.utilities import rank_zero_warn

    name = f"round {round_index}"
    pngs: dict[str, np.ndarray] = {}
    native = [log_histogram(logger, "selection/scores", result.scores, step) for logger in loggers]
    if loggers and not all(native):
        image = histogram_image(result.scores, selected, f"{name}: scores (dark: selected)")
        if not all([done or log_image(lg, "selection/scores", image, step)
                    for lg, done in zip(loggers, native, strict=True)]):  # fmt: skip
            pngs["scores"] = image
    if gallery:
        given = result.ids if result.uids is None else result.uids
        picked = pick_gallery(result.ids, result.scores, selected, previous, gallery)
        rows = np.unique(np.concatenate(list(picked.values())))
        order = getattr(result, "order", None)
        loaded, missing = load_pairs(datamodule, [given[i].item() for i in rows],
                                     result.indices[rows] if result.positional else None, thumbnail_size,
                                     order=None if order is None else order[rows])  # fmt: skip
        pairs = gallery_pairs(picked, given, result.scores, loaded, missing)
        if round_file is not None:
            write_gallery(gallery_path(round_file), pairs, thumbnail_size)
        for kind in picked:
            grid = render_grid([p for p in pairs if p.kind == kind], f"{name}: {kind} {gallery}")
            if not all([log_image(logger, f"selection/{kind}", grid, step) for logger in loggers]):
                pngs[kind] = grid
        if missing:
            rank_zero_warn(f"[lightning-chips] {name}: {len(missing)} gallery pairs could not be loaded (listed in "
                           f"the gallery file): {list(missing.items())[:3]}")  # fmt: skip
    if round_file is not None and loggers:
        for kind, image in pngs.items():
            with atomic_writer(round_file.with_name(f"{round_file.stem}_{kind}.png")) as f:
                f.write(png_bytes(image))
