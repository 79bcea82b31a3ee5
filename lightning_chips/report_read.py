"""What ``lightning-chips report`` reads (:mod:`lightning_chips.report`): round files and gallery files into
:class:`Round` s, a score folder's selection and damage, and the :class:`Summary` of each round the page is drawn
from (:mod:`lightning_chips.report_render`); galleries missing from the files are read from the pool's shards.

A round is summarised right after it is read (its arrays are then dropped): the report holds one round's arrays
plus every round's selected ids and scores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_chips.gallery import bottom_rows, entered_rows, fetch_shard_pairs, score_order, top_rows
from lightning_chips.io import READ_ERRORS

__all__ = [
    "ROUND_FILE",
    "Problem",
    "Round",
    "Summary",
    "fill_galleries",
    "load_rounds",
    "manifest_damage",
    "read_round",
    "round_sources",
    "select_offline",
    "summarize",
]

ROUND_FILE = re.compile(r"round_(\d{4,})\.npz")
Problem = tuple[str, str]
"""``(what, error)``: something the report could not read, listed on the page."""


@dataclass
class Round:
    """One selection round as the report reads it.

    Attributes:
        index: the round (from the file name); ``name``: the file name.
        ids, scores, selected: one entry per pool pair, sorted by id; ``selected`` is None for a score folder read
            without a selection.
        groups: field -> (distinct values, int codes aligned with ``ids``).
        skipped, shard_errors: ``"id: reason"`` of the pool pairs the round skipped, ``"shard: error"`` of the
            shards it could not read to the end.
        gallery: the items of ``round_XXXX_gallery.npz`` (``kind``, ``id``, ``score``, ``caption``, ``image``: uint8
            [S, S, 3]), or None without one.
    """

    index: int
    name: str
    ids: np.ndarray
    scores: np.ndarray
    selected: np.ndarray | None
    method: str = ""
    fraction: float | None = None
    settings: str | None = None
    groups: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    shard_errors: list[str] = field(default_factory=list)
    pool_pairs: int | None = None
    gallery: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if len(self.ids) > 1 and not (self.ids[1:] >= self.ids[:-1]).all():  # the writers sort; a hand-made file?
            order = np.argsort(self.ids, kind="stable")
            self.ids, self.scores = self.ids[order], self.scores[order]
            self.selected = None if self.selected is None else self.selected[order]
            self.groups = {name: (values, codes[order]) for name, (values, codes) in self.groups.items()}


def _scalar(arrays: dict[str, np.ndarray], key: str, default: Any = None) -> Any:
    value = arrays.get(key)
    return value.item() if value is not None and value.ndim == 0 else default


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def _groups(arrays: dict[str, np.ndarray], n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from lightning_chips.groups import read_group_arrays

    return {name: (c.values, c.codes.astype(np.int64)) for name, c in read_group_arrays(arrays, n).items()}


def _read_round(path: Path, index: int, problems: list[Problem]) -> Round | None:
    try:
        arrays = _load(path)
    except READ_ERRORS as exc:
        problems.append((path.name, f"unreadable ({type(exc).__name__}: {exc})"))
        return None
    missing = [key for key in ("ids", "scores", "selected") if key not in arrays]
    if missing:
        problems.append((path.name, f"lacks {', '.join(missing)}: not a round file of DataSelectionCallback"))
        return None
    ids, scores, selected = (arrays[k].reshape(-1) for k in ("ids", "scores", "selected"))
    if not len(ids) == len(scores) == len(selected):
        problems.append((path.name, f"ids, scores and selected have {len(ids)}, {len(scores)}, {len(selected)} "
                                    "entries (one per pool pair expected)"))  # fmt: skip
        return None
    if scores.dtype.kind not in "fiu" or ids.dtype.kind not in "iuU":
        problems.append((path.name, f"ids must be integers or strings and scores numbers: got {ids.dtype} ids, "
                                    f"{scores.dtype} scores"))  # fmt: skip
        return None
    try:
        groups = _groups(arrays, len(ids))
    except ValueError as exc:
        problems.append((path.name, f"group arrays ignored: {exc}"))
        groups = {}
    fraction = _scalar(arrays, "fraction")
    reasons = arrays.get("bad_reasons", np.array([], dtype=str)).reshape(-1).astype(str).tolist()
    names = next((arrays[k].reshape(-1).astype(str).tolist() for k in ("bad_ids", "bad_keys") if k in arrays), [])
    names = ["(no id)" if n in ("", str(np.iinfo(np.int64).min)) else n for n in names]
    shards = zip(*(arrays.get(k, np.array([], dtype=str)).astype(str).tolist()
                   for k in ("unreadable_shards", "shard_errors")), strict=False)  # fmt: skip
    return Round(
        index, path.name, ids, scores, selected.astype(bool), str(_scalar(arrays, "method", "")),
        None if fraction is None else float(fraction), _scalar(arrays, "settings"), groups,
        [f"{n}: {r}" for n, r in zip(names + ["?"] * len(reasons), reasons, strict=False)],
        [f"{url}: {error}" for url, error in shards],
        None if _scalar(arrays, "pool_pairs") is None else int(_scalar(arrays, "pool_pairs")),
    )  # fmt: skip


def _read_gallery(path: Path, round_index: int, problems: list[Problem]) -> list[dict[str, Any]] | None:
    try:
        arrays = _load(path)
        ids, kinds, scores, captions, thumbs = (arrays[k] for k in ("ids", "kinds", "scores", "captions",
                                                                     "thumbnails"))  # fmt: skip
        if thumbs.ndim != 4 or thumbs.shape[-1] != 3 or not len(ids) == len(kinds) == len(scores) == len(thumbs):
            raise ValueError(f"{len(ids)} ids, {len(kinds)} kinds, {len(scores)} scores, thumbnails {thumbs.shape}")
    except READ_ERRORS as exc:
        problems.append((path.name, f"gallery unreadable ({type(exc).__name__}: {exc})"))
        return None
    for uid, reason in zip(arrays.get("missing_ids", []), arrays.get("missing_reasons", []), strict=False):
        problems.append((f"round {round_index} gallery pair {uid}", str(reason)))
    return [{"kind": str(k), "id": str(i), "score": float(s), "caption": str(c), "image": t}
            for i, k, s, c, t in zip(ids.tolist(), kinds.tolist(), scores.tolist(), captions.tolist(), thumbs,
                                     strict=False)]  # fmt: skip


def _round_folder(run_dir: Path) -> Path | None:
    for folder in (run_dir, run_dir / "selection"):
        if folder.is_dir() and any(ROUND_FILE.fullmatch(p.name) for p in folder.iterdir()):
            return folder
    return None


def round_sources(run_dir: Path) -> tuple[bool, list[tuple[int, Path]]]:
    """``(offline, [(round, file)])``: the round files of a run folder, or its ``scores.npz`` (offline)."""
    folder = _round_folder(run_dir)
    if folder is not None:
        return False, sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := ROUND_FILE.fullmatch(p.name)))
    if (run_dir / "scores.npz").is_file():
        return True, [(0, run_dir / "scores.npz")]
    raise ValueError(f"{run_dir} is not a selection run: expected round files (round_0000.npz, ... written by "
                     f"DataSelectionCallback) in {run_dir} or {run_dir / 'selection'}, or a scores.npz written by "
                     "`lightning-chips score`. Pass the run's log folder, its selection folder or a score output "
                     "folder.")  # fmt: skip


def _read_scores(path: Path, problems: list[Problem]) -> Round | None:
    try:
        arrays = _load(path)
        ids, scores = arrays["ids"].reshape(-1), arrays["scores"].reshape(-1)
        if len(ids) != len(scores):
            raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
        groups = _groups(arrays, len(ids))
    except READ_ERRORS as exc:
        problems.append((path.name, f"unreadable ({type(exc).__name__}: {exc})"))
        return None
    scorer = _scalar(arrays, "scorer")
    return Round(0, path.name, ids, scores, None, str(_scalar(arrays, "method", "")), None,
                 None if scorer is None else str(scorer), groups)  # fmt: skip


def read_round(index: int, path: Path, offline: bool, problems: list[Problem]) -> Round | None:
    """One round with its gallery file (None, the problem recorded, when the file cannot be read)."""
    if offline:
        return _read_scores(path, problems)
    r = _read_round(path, index, problems)
    gallery = path.with_name(f"round_{index:04d}_gallery.npz")
    if r is not None and gallery.exists():
        r.gallery = _read_gallery(gallery, index, problems)
    return r


def load_rounds(run_dir: str | os.PathLike) -> tuple[list[Round], list[Problem]]:
    """The rounds of a run folder (RUN_DIR or RUN_DIR/selection, with their gallery files) or of a ``score``
    output folder (``scores.npz``: round 0, without a selection), and the ``(what, error)`` problems met: a round
    file that cannot be read is a problem and is left out. Holds every round's arrays (:func:`build_report` reads
    one round at a time).

    Raises:
        ValueError: when ``run_dir`` holds neither round files nor ``scores.npz``.

    Example::

        >>> rounds, problems = load_rounds("lightning_logs/version_0")  # doctest: +SKIP
        >>> [(r.index, int(r.selected.sum())) for r in rounds]  # doctest: +SKIP
        [(0, 1920), (1, 1920), (2, 1920)]
    """
    problems: list[Problem] = []
    offline, files = round_sources(Path(run_dir))
    return [r for i, p in files if (r := read_round(i, p, offline, problems)) is not None], problems


@dataclass
class Summary:
    """What the page shows of one round. Made right after the round is read, so the report holds one round's
    arrays at a time, plus the selected ids and scores of every round (for the overlap and entered / left)."""

    index: int
    name: str
    method: str
    fraction: float | None
    settings: str | None
    size: int
    stats: list[str]  # min, median, max of the finite scores
    nonfinite: int
    hist: tuple[np.ndarray, np.ndarray] | None  # density, bin edges
    chosen: np.ndarray | None  # the selected ids, sorted
    chosen_scores: np.ndarray | None
    groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]  # values, pool counts, selected counts
    skipped: list[str]
    shard_errors: list[str]
    gallery: list[dict[str, Any]] | None
    picks: list[tuple[str, Any, float]]  # (kind, id, score) to read from the pool when there is no gallery
    pool_pairs: int = 0  # usable pool pairs: ``size`` unless a candidate round scored a part of the pool


def _picks(r: Round, previous: Summary | None, k: int) -> list[tuple[str, Any, float]]:
    """(kind, id, score) of the pairs a round's gallery shows, picked as the callback picks them
    (:func:`~lightning_chips.gallery.pick_gallery`): the k highest and the k lowest scores, the k highest-scored
    pairs that entered the selection and the k lowest-scored that left it since ``previous`` (a pair that left the
    pool too is shown with its score of the last round)."""
    order = score_order(r.ids, r.scores)
    rows = [("top", top_rows(order, k)), ("bottom", bottom_rows(order, k))]
    before = None if previous is None else previous.chosen
    if r.selected is not None and before is not None and before.dtype.kind == r.ids.dtype.kind:
        rows.append(("entered", entered_rows(order, r.selected, np.isin(r.ids, before), k)))
    out = [(kind, r.ids[i].item(), float(r.scores[i])) for kind, picked in rows for i in picked]
    if len(rows) == 2:
        return out
    left = np.setdiff1d(before, r.ids[r.selected])  # may have left the pool too: then its score of last round
    pos = np.minimum(np.searchsorted(r.ids, left), max(len(r.ids) - 1, 0))
    here = r.ids[pos] == left if len(r.ids) else np.zeros(len(left), bool)
    scores = np.where(here, r.scores[pos] if len(r.ids) else 0, previous.chosen_scores[np.searchsorted(before, left)])
    # every id of `left` was selected last round and is not now: the left rows of its order are its lowest
    return out + [("left", left[i].item(), float(scores[i])) for i in bottom_rows(score_order(left, scores), k)]


def summarize(r: Round, previous: Summary | None, k: int) -> Summary:
    finite = r.scores[np.isfinite(r.scores)].astype(np.float64)
    sel = r.selected
    groups = {name: (values, np.bincount(codes, minlength=len(values)),
                     None if sel is None else np.bincount(codes[sel], minlength=len(values)))
              for name, (values, codes) in r.groups.items()}  # fmt: skip
    return Summary(
        r.index, r.name, r.method, r.fraction, r.settings, len(r.ids),
        [f"{q:.4g}" for q in np.quantile(finite, (0, 0.5, 1))] if len(finite) else ["–"] * 3,
        len(r.ids) - len(finite), np.histogram(finite, bins=60, density=True) if len(finite) else None,
        None if sel is None else r.ids[sel], None if sel is None else r.scores[sel], groups, r.skipped,
        r.shard_errors, r.gallery, _picks(r, previous, k) if r.gallery is None and k else [],
        r.pool_pairs if r.pool_pairs is not None else len(r.ids),
    )  # fmt: skip


def fill_galleries(rounds: list[Summary], urls: Sequence[str], uid_field: str, size: int,
                    problems: list[Problem]) -> None:  # fmt: skip
    """Fill the galleries of the rounds that have none from the pool's shards (one pass for every round)."""
    wanted = list(dict.fromkeys(uid for r in rounds if r.gallery is None for _, uid, _ in r.picks))
    found, missing = fetch_shard_pairs(urls, wanted, uid_field=uid_field, size=size) if wanted else ({}, {})
    for r in (r for r in rounds if r.gallery is None and r.picks):
        r.gallery = []
        for kind, uid, score in r.picks:
            if uid in found:
                image, caption = found[uid]
                r.gallery.append({"image": image, "caption": caption, "kind": kind, "id": str(uid), "score": score})
            else:
                problems.append((f"round {r.index} gallery pair {uid} ({kind})", missing.get(uid, "not found")))


def select_offline(r: Round, chosen: np.ndarray | None, fraction: float | None, selection: Any,
                    problems: list[Problem]) -> None:  # fmt: skip
    """The selection of a score folder's round: the ids of a ``select`` output, or the top ``fraction``."""
    if chosen is not None:
        if (chosen.dtype.kind == "U") != (r.ids.dtype.kind == "U"):
            raise ValueError(f"{selection} holds {'string' if chosen.dtype.kind == 'U' else 'integer'} ids but "
                             f"scores.npz holds {r.ids.dtype} ids: is it a selection of this pool?")  # fmt: skip
        r.selected = np.isin(r.ids, chosen)
        r.fraction = float(r.selected.mean()) if len(r.ids) else None
        unknown = len(np.unique(chosen)) - int(r.selected.sum())
        if unknown:
            problems.append((Path(selection).name, f"{unknown} selected ids are not in scores.npz"))
    elif fraction is not None and len(r.ids):
        from lightning_chips.selection import budget_for

        r.selected = np.zeros(len(r.ids), bool)
        r.selected[score_order(r.ids, r.scores)[: budget_for(len(r.ids), float(fraction))]] = True
        r.fraction = float(fraction)


def manifest_damage(manifest: dict[str, Any], problems: list[Problem]) -> tuple[list[str], list[str]]:
    """The skipped samples (``"key (shard): reason"``) and the shards not read to the end (``"shard: error"``) a
    score folder's ``manifest.json`` records, for the round's statistics; each damaged shard and the skipped
    samples are also added to ``problems``."""
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), dict) else {}
    skipped = [f"{b.get('key')} ({url}): {b.get('reason')}" for url, shard in shards.items() if isinstance(shard, dict)
               for b in (shard.get("bad") or []) if isinstance(b, dict)]  # fmt: skip
    count = manifest.get("skipped")
    if isinstance(count, int) and not isinstance(count, bool) and count > len(skipped):  # named or not, all counted
        skipped += ["(not named in manifest.json)"] * (count - len(skipped))
    errors = [s for s in manifest.get("unreadable_shards") or [] if isinstance(s, dict)]
    shard_errors = [f"{s.get('url')}: {s.get('error')}" for s in errors]
    for s in errors:
        problems.append((f"shard {s.get('url')}", f"not read to the end: {s.get('error')}. The pairs after the damage "
                         "point were not scored: repair the shard and re-run `lightning-chips score` into this "
                         "folder, which scores it again"))  # fmt: skip
    if skipped:
        first = "; ".join(skipped[:3])
        problems.append(("skipped samples", f"{len(skipped)} pool samples were skipped, not scored (manifest.json "
                         f"names each one; first: {first})"))  # fmt: skip
    return skipped, shard_errors
