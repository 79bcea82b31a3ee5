"""``lightning-chips report``: one self-contained HTML page over the selection rounds of a run.

The input is a :class:`~lightning_chips.callback.DataSelectionCallback` run (``round_0000.npz``, ... in RUN_DIR or
RUN_DIR/selection, with ``round_0000_gallery.npz`` beside a round when the callback saved a gallery) or an offline
``lightning-chips score`` folder (``scores.npz`` + ``manifest.json``: one round, selected by ``selection`` or
``fraction``). The page makes no network request (figures and thumbnails are ``data:`` URIs, the CSS is inline,
there is no script) and holds:

1. the settings of the run: method, fraction, rounds, pool size, the ``settings`` JSON, group fields;
2. the score distribution of each round (a histogram line per round) and per-round statistics, skipped pairs
   included;
3. the round-to-round overlap: the share of round i's selection also selected in round j (heatmap and table);
4. per group field, pool share vs selected share per round and *kept* (selected / pool count of the group); a row
   whose kept share is under 10 % of the round's overall fraction is marked ``starved``;
5. galleries per round (top, bottom, entered, left: thumbnail, caption, id, score), from the gallery files or read
   from the pool's WebDataset shards (``pool``; the score manifest's pool for an offline folder);
6. problems: round files that could not be read, gallery pairs that could not be loaded and, for a score folder,
   the damage its ``manifest.json`` records (skipped samples, shards not read to the end, named). None is fatal;
   only a manifest pool that names a ``pipe:`` or URL shard is refused (pass ``pool``).

Plots need matplotlib (``pip install 'lightning-chips[report]'``); without it the page keeps every table and gallery.

One module because it is one thing: round files read one at a time into a :class:`Round`, summarised (the round's
arrays are dropped; the page holds one round's arrays plus every round's selected ids), and rendered as one page;
loaders, pool reads, figures and HTML sections share only those objects.

Example::

    >>> build_report("lightning_logs/version_0")  # doctest: +SKIP
    [lightning-chips] report: 3 rounds, 96 gallery images -> lightning_logs/version_0/report.html
    >>> build_report("scores/chips", fraction=0.3, pool="pool/{000000..000099}.tar", out="chips.html")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_chips.ids import id_keys
from lightning_chips.io import READ_ERRORS, atomic_writer

__all__ = ["KINDS", "Round", "build_report", "load_rounds"]

ROUND_FILE = re.compile(r"round_(\d{4,})\.npz")
KINDS: tuple[str, ...] = ("top", "bottom", "entered", "left")
STARVED = 0.1
"""A group is starved when its kept share is below this share of the round's overall fraction."""
PLOTS_HINT = "Plots need matplotlib: pip install 'lightning-chips[report]'"
NO_GALLERY = "No gallery saved for this round (set `gallery=K` on DataSelectionCallback, or pass --pool)"
_READ_ERRORS = READ_ERRORS  # what a damaged .npz can raise (lightning_chips.io)
Problem = tuple[str, str]


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
    except _READ_ERRORS as exc:
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
    )  # fmt: skip


def _read_gallery(path: Path, round_index: int, problems: list[Problem]) -> list[dict[str, Any]] | None:
    try:
        arrays = _load(path)
        ids, kinds, scores, captions, thumbs = (arrays[k] for k in ("ids", "kinds", "scores", "captions",
                                                                     "thumbnails"))  # fmt: skip
        if thumbs.ndim != 4 or thumbs.shape[-1] != 3 or not len(ids) == len(kinds) == len(scores) == len(thumbs):
            raise ValueError(f"{len(ids)} ids, {len(kinds)} kinds, {len(scores)} scores, thumbnails {thumbs.shape}")
    except _READ_ERRORS as exc:
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


def _sources(run_dir: Path) -> tuple[bool, list[tuple[int, Path]]]:
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
    except _READ_ERRORS as exc:
        problems.append((path.name, f"unreadable ({type(exc).__name__}: {exc})"))
        return None
    scorer = _scalar(arrays, "scorer")
    return Round(0, path.name, ids, scores, None, str(_scalar(arrays, "method", "")), None,
                 None if scorer is None else str(scorer), groups)  # fmt: skip


def _read(index: int, path: Path, offline: bool, problems: list[Problem]) -> Round | None:
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
    offline, files = _sources(Path(run_dir))
    return [r for i, p in files if (r := _read(i, p, offline, problems)) is not None], problems


def _order(ids: np.ndarray, scores: np.ndarray, keys: bool = False) -> np.ndarray:
    """Indices by score descending (NaN last), ties by id ascending (``keys``: by int64 key, as ``select`` does)."""
    s = np.where(np.isfinite(scores), scores, -np.inf)
    return np.lexsort((id_keys(ids) if keys else ids, -s))


@dataclass
class _Summary:
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


def _picks(r: Round, previous: _Summary | None, k: int) -> list[tuple[str, Any, float]]:
    """(kind, id, score) of the pairs a round's gallery shows: the k highest and the k lowest scores, the k
    highest-scored pairs that entered the selection and the k lowest-scored that left it since ``previous``."""
    order = _order(r.ids, r.scores)
    picks = [("top", i) for i in order[:k]] + [("bottom", i) for i in order[::-1][:k]]
    before = None if previous is None else previous.chosen
    if r.selected is None or before is None or before.dtype.kind != r.ids.dtype.kind:
        return [(kind, r.ids[i].item(), float(r.scores[i])) for kind, i in picks]
    picks += [("entered", i) for i in order[(r.selected & ~np.isin(r.ids, before))[order]][:k]]
    out = [(kind, r.ids[i].item(), float(r.scores[i])) for kind, i in picks]
    left = np.setdiff1d(before, r.ids[r.selected])  # may have left the pool too: then its score of last round
    pos = np.minimum(np.searchsorted(r.ids, left), max(len(r.ids) - 1, 0))
    here = r.ids[pos] == left if len(r.ids) else np.zeros(len(left), bool)
    scores = np.where(here, r.scores[pos] if len(r.ids) else 0, previous.chosen_scores[np.searchsorted(before, left)])
    return out + [("left", left[i].item(), float(scores[i])) for i in _order(left, scores)[::-1][:k]]


def _summarize(r: Round, previous: _Summary | None, k: int) -> _Summary:
    finite = r.scores[np.isfinite(r.scores)].astype(np.float64)
    sel = r.selected
    groups = {name: (values, np.bincount(codes, minlength=len(values)),
                     None if sel is None else np.bincount(codes[sel], minlength=len(values)))
              for name, (values, codes) in r.groups.items()}  # fmt: skip
    return _Summary(
        r.index, r.name, r.method, r.fraction, r.settings, len(r.ids),
        [f"{q:.4g}" for q in np.quantile(finite, (0, 0.5, 1))] if len(finite) else ["–"] * 3,
        len(r.ids) - len(finite), np.histogram(finite, bins=60, density=True) if len(finite) else None,
        None if sel is None else r.ids[sel], None if sel is None else r.scores[sel], groups, r.skipped,
        r.shard_errors, r.gallery, _picks(r, previous, k) if r.gallery is None and k else [],
    )  # fmt: skip


def _fill_galleries(rounds: list[_Summary], urls: Sequence[str], uid_field: str, size: int,
                    problems: list[Problem]) -> None:  # fmt: skip
    """Fill the galleries of the rounds that have none from the pool's shards (one pass for every round)."""
    from lightning_chips.gallery import fetch_shard_pairs

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


def _png(array: np.ndarray) -> str:
    from lightning_chips.gallery import png_bytes

    data = png_bytes(np.ascontiguousarray(array, dtype=np.uint8))
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plotter() -> Callable[[Callable[[Any], None], tuple[float, float]], str] | None:
    """``render(draw, figsize) -> PNG data URI`` with a matplotlib Figure (no pyplot, no global state), or None
    without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def render(draw: Callable[[Any], None], figsize: tuple[float, float]) -> str:
        fig = Figure(figsize=figsize, dpi=100)
        FigureCanvasAgg(fig)
        draw(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    return render


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["viridis"](i / max(n - 1, 1) * 0.9) for i in range(n)]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{100 * value:.1f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    classes = list(classes) + [""] * (len(rows) - len(classes))
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join((f'<tr class="{_e(c)}">' if c else "<tr>") + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>"
                   for row, c in zip(rows, classes, strict=True))  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(render: Callable | None, draw: Callable[[Any], None], figsize: tuple[float, float], alt: str) -> str:
    if render is None:
        return ""
    try:
        return f'<img class="plot" src="{render(draw, figsize)}" alt="{_e(alt)}">'
    except Exception as exc:  # a plot is never worth the page: its tables follow
        return f'<p class="note">The {_e(alt)} plot failed ({_e(type(exc).__name__)}: {_e(exc)}).</p>'


def _text(value: Any) -> str:
    """``value`` as literal matplotlib text (a ``$`` would start mathtext)."""
    return str(value).replace("$", r"\$")


def _settings_section(rounds: list[_Summary], run_dir: Path, offline: bool, manifest: dict[str, Any]) -> str:
    sizes = sorted({r.size for r in rounds})
    fractions = sorted({r.fraction for r in rounds if r.fraction is not None})
    names = [r.name for r in rounds[:3]] + ["..."] * (len(rounds) > 3)
    rows = [
        ("run", run_dir),
        ("source", "`lightning-chips score` folder (scores.npz, one round)" if offline
         else f"DataSelectionCallback round files ({', '.join(names)})"),
        ("method", ", ".join(sorted({r.method for r in rounds if r.method})) or "–"),
        ("fraction", ", ".join(f"{f:g}" for f in fractions) or "– (no selection)"),
        ("rounds", f"{len(rounds)}" + (f" ({', '.join(str(r.index) for r in rounds)})" if rounds else "")),
        ("pool size", " – ".join(f"{n:,}" for n in sizes[:: max(len(sizes) - 1, 1)]) or "–"),
        ("group fields", ", ".join(sorted({name for r in rounds for name in r.groups})) or "none"),
    ]  # fmt: skip
    if offline:
        rows += [(key, manifest[key]) for key in ("uid_field", "scored", "skipped") if key in manifest]
        estimate = manifest.get("estimate")
        rows += [(f"estimate.{k}", f"{v:.3g}" if isinstance(v, float) else v)
                 for k, v in (estimate.items() if isinstance(estimate, dict) else ())]  # fmt: skip
        if isinstance(manifest.get("shards"), dict | list):
            rows.append(("shards", len(manifest["shards"])))
    parsed: list[tuple[int, dict[str, Any] | str]] = []
    for r in rounds:
        if r.settings:
            try:
                value = json.loads(r.settings)
            except ValueError:
                value = r.settings
            parsed.append((r.index, value if isinstance(value, dict) else str(value)))
    if not parsed:
        return _table(("setting", "value"), rows)
    label = "scorer" if offline else "settings"
    if not all(isinstance(v, dict) for _, v in parsed):  # not JSON objects: shown as they are, once each
        text = _table(("setting", "value"), rows)
        for value in dict.fromkeys(str(v) for _, v in parsed):
            text += f"<h3>{_e(label)}</h3><pre>{_e(value)}</pre>"
        return text
    keys = list(dict.fromkeys(k for _, v in parsed for k in v))  # type: ignore[union-attr]
    shown = {k: [json.dumps(v.get(k)) if not isinstance(v.get(k), str) else v.get(k) for _, v in parsed]  # type: ignore[union-attr]
             for k in keys}  # fmt: skip
    same = [k for k in keys if len(set(shown[k])) == 1]
    varying = [k for k in keys if k not in same]
    text = _table(("setting", "value"), rows + [(k, shown[k][0]) for k in same])  # one table of what holds
    if varying:
        text += "<h3>settings that change between rounds</h3>" + _table(
            ("round", *varying), [(i, *(shown[k][j] for k in varying)) for j, (i, _) in enumerate(parsed)]
        )
    return text


def _scores_section(rounds: list[_Summary], render: Callable | None) -> str:
    drawn = [r for r in rounds if r.hist is not None]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for r, color in zip(drawn, _colors(len(drawn)), strict=True):
            ax.stairs(*r.hist, color=color, linewidth=1.4, label=f"round {r.index}")
        ax.set(xlabel="score", ylabel="density", title="score distribution per round")
        ax.legend(fontsize="small", ncol=1 + len(drawn) // 16, loc="upper left", bbox_to_anchor=(1.01, 1))

    rows = []
    for r in rounds:
        n_sel = None if r.chosen is None else len(r.chosen)
        finite = np.array([]) if r.chosen_scores is None else r.chosen_scores[np.isfinite(r.chosen_scores)]
        rows.append((r.index, r.name, f"{r.size:,}", "–" if n_sel is None else f"{n_sel:,}",
                     _pct(n_sel / r.size) if n_sel is not None and r.size else "–", *r.stats,
                     f"{finite.min():.4g}" if len(finite) else "–", r.nonfinite, len(r.skipped),
                     len(r.shard_errors)))  # fmt: skip
    text = _figure(render, draw, (8, 4), "score histograms") if drawn else ""
    text += _table(("round", "file", "pool pairs", "selected", "selected share", "min", "median", "max",
                    "lowest selected", "NaN/inf scores", "skipped pairs", "unreadable shards"), rows)  # fmt: skip
    for r in rounds:
        if r.skipped or r.shard_errors:
            items = "".join(f"<li>{_e(line)}</li>" for line in r.shard_errors[:5] + r.skipped[:5])
            text += (f"<details open><summary>round {r.index}: {len(r.skipped)} skipped pool pairs, "
                     f"{len(r.shard_errors)} unreadable shards (first reasons)</summary>"
                     f"<ul>{items}</ul></details>")  # fmt: skip
    return text


def _overlap_section(rounds: list[_Summary], render: Callable | None) -> str:
    chosen = [(r.index, r.chosen) for r in rounds if r.chosen is not None]
    if len(chosen) < 2:
        return '<p class="note">The overlap needs two or more rounds with a selection.</p>'
    matrix = np.full((len(chosen), len(chosen)), np.nan)
    for i, (_, a) in enumerate(chosen):
        for j, (_, b) in enumerate(chosen):
            if len(a) and len(b) and a.dtype.kind == b.dtype.kind:
                pos = np.minimum(np.searchsorted(b, a), len(b) - 1)
                matrix[i, j] = float(np.mean(b[pos] == a))
    labels = [str(index) for index, _ in chosen]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
               xlabel="round j", ylabel="round i", title="share of round i's selection also in round j")  # fmt: skip
        fig.colorbar(image, ax=ax)
        if len(labels) <= 12:
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")

    side = min(3 + 0.5 * len(labels), 12)
    cells = [[f"{v:.3f}" if np.isfinite(v) else "–" for v in row] for row in matrix]
    rows = [(f"round {label}", *row) for label, row in zip(labels, cells, strict=True)]
    return _figure(render, draw, (side + 1.5, side), "overlap heatmap") + _table(("i \\ j", *labels), rows)


def _groups_section(rounds: list[_Summary], render: Callable | None) -> str:
    fields = sorted({name for r in rounds for name in r.groups})
    if not fields:
        return '<p class="note">No group fields in the round files.</p>'
    text = ""
    for name in fields:
        having = [r for r in rounds if name in r.groups]
        rows, classes = [], []
        for r in having:
            values, pool, sel = r.groups[name]
            n_sel = None if sel is None else max(int(sel.sum()), 1)
            overall = None if sel is None or not r.size else sel.sum() / r.size
            for v in np.argsort(-pool, kind="stable"):
                if pool[v] == 0:
                    continue
                row = [r.index, values[v], f"{pool[v]:,}", _pct(pool[v] / r.size)]
                starved = sel is not None and sel[v] / pool[v] < STARVED * overall
                if sel is not None:
                    row += [f"{sel[v]:,}", _pct(sel[v] / n_sel), _pct(sel[v] / pool[v]), "starved" if starved else ""]
                rows.append(row)
                classes.append("starved" if starved else "")
        header = ["round", name, "pool pairs", "pool share"]
        if any(r.groups[name][2] is not None for r in having):
            header += ["selected", "selected share", "kept (selected / pool)", "status"]
        values, pool, _ = having[0].groups[name]
        top = np.argsort(-pool, kind="stable")[:30]
        shown = [r for r in having if r.groups[name][2] is not None]
        shown = [shown[i] for i in sorted(set(np.linspace(0, len(shown) - 1, min(len(shown), 8)).astype(int)))]

        def draw(fig: Any, name: str = name, first: _Summary = having[0], top: np.ndarray = top,
                 shown: list = shown) -> None:  # fmt: skip
            ax = fig.add_subplot()
            width = 0.8 / (1 + len(shown))
            x = np.arange(len(top))
            values, pool, _ = first.groups[name]
            ax.bar(x, pool[top] / max(pool.sum(), 1), width, color="0.6", label=f"pool (round {first.index})")
            for k, (r, color) in enumerate(zip(shown, _colors(len(shown)), strict=True)):
                counts = dict(zip(r.groups[name][0].tolist(), r.groups[name][2].tolist(), strict=True))
                total = max(sum(counts.values()), 1)
                ax.bar(x + (k + 1) * width, [counts.get(v, 0) / total for v in values[top].tolist()], width,
                       color=color, label=f"selected, round {r.index}")  # fmt: skip
            ax.set_xticks(x + 0.4 - width / 2, [_text(str(v)[:20]) for v in values[top]], rotation=45, ha="right")
            ax.set(ylabel="share", title=f"{_text(name)}: pool vs selection")
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))

        text += f"<h3>{_e(name)}</h3>" + _figure(render, draw, (max(6, 0.5 * len(top) + 3), 4), f"{name} shares")
        text += _table(header, rows, classes)
    return (f'<p class="note">A row is <span class="starved">starved</span> when its kept share is under '
            f"{STARVED:.0%} of the round's overall fraction.</p>") + text  # fmt: skip


KIND_NOTES = {"top": "highest scores", "bottom": "lowest scores", "entered": "selected this round, not the last",
              "left": "selected last round, not this one"}  # fmt: skip


def _gallery_section(rounds: list[_Summary], k: int, hint: str) -> tuple[str, int]:
    if k == 0:
        return '<p class="note">Galleries are off (gallery=0).</p>', 0
    lacking = [str(r.index) for r in rounds if r.gallery is None]
    text = f'<p class="note">{_e(hint)}: round {", ".join(lacking)}.</p>' if lacking else ""
    images = 0
    for n, r in enumerate(rounds):
        text += f'<section class="round" id="round-{r.index}"><h3>Round {r.index} <small>{_e(r.name)}</small></h3>'
        if r.gallery is None:
            text += '<p class="note">No gallery for this round.</p>'
        for kind in KINDS if r.gallery is not None else ():
            items = [item for item in r.gallery if item["kind"] == kind][:k]
            if kind in ("entered", "left") and not items and (n == 0 or r.chosen is None):
                continue
            text += f'<h4>{kind} <small>({len(items)}: {KIND_NOTES[kind]})</small></h4><div class="gallery">'
            for item in items:
                ident, size = _e(item["id"]), max(item["image"].shape[1], 96)  # small thumbnails shown larger
                text += (f'<figure class="item" data-id="{ident}" data-kind="{kind}" data-round="{r.index}">'
                         f'<img src="{_png(item["image"])}" width="{size}" height="{size}" alt="{ident}">'
                         f'<figcaption><span class="caption">{_e(item["caption"])}</span><code>{ident}</code> '
                         f'<span class="score">score {item["score"]:.4g}</span></figcaption></figure>')  # fmt: skip
            images += len(items)
            text += "</div>" if items else '<span class="note">none</span></div>'
        text += "</section>"
    return text, images


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1280px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:left}th{background:#f3f3f3}tr.starved{background:#fde0dc}span.starved{background:#fde0dc}
pre{background:#f7f7f7;padding:.6em;overflow:auto;max-height:24em}.note,.hint{color:#666}img.plot{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:.5em}.item{margin:0;width:10em;font-size:.75em;overflow-wrap:anywhere}
.item img{display:block;image-rendering:auto}.caption{display:block}.score{color:#555}nav a{margin-right:1em}"""


def _select_offline(r: Round, chosen: np.ndarray | None, fraction: float | None, selection: Any,
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
        r.selected[_order(r.ids, r.scores, keys=True)[: budget_for(len(r.ids), float(fraction))]] = True
        r.fraction = float(fraction)


def _manifest_damage(manifest: dict[str, Any], problems: list[Problem]) -> tuple[list[str], list[str]]:
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


def _expand(pool: str | Sequence[str], origin: str) -> list[str]:
    from lightning_chips.data.webdataset import expand_shards

    try:
        return expand_shards(pool)
    except ValueError as exc:
        raise ValueError(f"{origin}: {exc}") from None


def build_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    pool: str | Sequence[str] | None = None,
    selection: str | os.PathLike | None = None,
    fraction: float | None = None,
    gallery: int = 8,
    thumbnail_size: int = 96,
    uid_field: str | None = None,
) -> Path:
    """Write the HTML report of a selection run (see the module docstring for what it holds); returns its path.

    Args:
        run_dir: a DataSelectionCallback run (round files in it or in its ``selection/`` folder) or a
            ``lightning-chips score`` output folder.
        out: the HTML file (default ``run_dir/report.html``; a folder gets ``report.html`` inside).
        pool: WebDataset shards to read gallery pairs from, for rounds without a gallery file (default for a
            score folder: the pool its ``manifest.json`` names).
        selection: (score folder) a ``.npy`` of selected ids, as ``lightning-chips select --output`` writes.
        fraction: (score folder) select the top ``fraction`` by score instead (ties as ``select`` breaks them).
        gallery: pairs per gallery kind (top, bottom, entered, left); 0 leaves the galleries out.
        thumbnail_size: the side of the thumbnails read from ``pool``, in pixels.
        uid_field: the id's field in each shard sample's ``.json`` (default: the manifest's, else ``"uid"``).

    Example::

        >>> build_report("scores/chips", fraction=0.3, gallery=12)  # doctest: +SKIP
        [lightning-chips] report: 1 rounds, 24 gallery images -> scores/chips/report.html
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"RUN_DIR {run_dir} is not a folder: pass the folder holding round_0000.npz, ... (or its "
                         "parent log folder) or a `lightning-chips score` output folder.")  # fmt: skip
    for name, value, low, high in (("gallery", gallery, 0, 1000), ("thumbnail_size", thumbnail_size, 8, 1024)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
            raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {value!r}.")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                 or not 0 < fraction <= 1):  # fmt: skip
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}.")
    if selection is not None and fraction is not None:
        raise ValueError("Pass `selection` (a .npy of selected ids) or `fraction`, not both.")
    if uid_field is not None and (not isinstance(uid_field, str) or not uid_field):
        raise ValueError(f"`uid_field` must be a non-empty string, got {uid_field!r}.")
    offline, files = _sources(run_dir)
    if (selection is not None or fraction is not None) and not offline:
        raise ValueError("`selection` / `fraction` apply to a `lightning-chips score` folder; the round files of "
                         f"{run_dir} hold their own selection: leave them out.")  # fmt: skip
    chosen = None
    if selection is not None:
        if not Path(selection).is_file():
            raise ValueError(f"No selection file {selection}: pass the .npy that `lightning-chips select --output` "
                             "wrote.")  # fmt: skip
        try:
            chosen = np.load(selection, allow_pickle=False).reshape(-1)
        except _READ_ERRORS as exc:
            raise ValueError(f"{selection} is not a .npy of ids ({type(exc).__name__}: {exc}).") from None
        if chosen.dtype.kind not in "iuU":
            raise ValueError(f"{selection} holds {chosen.dtype} values; expected int64 or string ids.")
    urls = None if pool is None else _expand(pool, "--pool")
    out = run_dir / "report.html" if out is None else Path(out)
    out = out / "report.html" if out.is_dir() else out

    problems: list[Problem] = []
    manifest: dict[str, Any] = {}
    if offline and (run_dir / "manifest.json").is_file():
        try:
            manifest = json.loads((run_dir / "manifest.json").read_text("utf-8"))
            manifest = manifest if isinstance(manifest, dict) else {}
        except (ValueError, OSError) as exc:
            problems.append(("manifest.json", f"unreadable ({type(exc).__name__}: {exc})"))
    uid_field = uid_field or str(manifest.get("uid_field") or "uid")
    if urls is None and isinstance(manifest.get("pool"), list) and gallery:
        from lightning_chips.offline import RefusedShardError, manifest_pool

        try:
            urls = manifest_pool(manifest["pool"], run_dir / "manifest.json")
        except RefusedShardError:
            raise  # a pipe: or URL shard in a manifest is refused, not a problem: the user passes --pool
        except (OSError, ValueError) as exc:
            problems.append(("manifest.json pool", f"{exc} (pass --pool with the shards' place)"))
    skipped, shard_errors = _manifest_damage(manifest, problems) if offline else ([], [])
    rounds: list[_Summary] = []
    for index, path in files:  # one round's arrays at a time
        r = _read(index, path, offline, problems)
        if r is not None and offline:
            _select_offline(r, chosen, fraction, selection, problems)
            r.skipped, r.shard_errors = skipped, shard_errors
        if r is not None:
            rounds.append(_summarize(r, rounds[-1] if rounds else None, gallery))
    if gallery and urls:
        _fill_galleries(rounds, urls, uid_field, thumbnail_size, problems)

    render = _plotter()
    hint = "No gallery: pass --pool (the score manifest names no readable pool)" if offline else NO_GALLERY
    galleries, images = _gallery_section(rounds, gallery, hint)
    sections = [
        ("settings", "Settings", _settings_section(rounds, run_dir, offline, manifest)),
        ("scores", "Score distributions", _scores_section(rounds, render) if rounds else ""),
        ("overlap", "Round-to-round overlap", _overlap_section(rounds, render)),
        ("groups", "Group composition", _groups_section(rounds, render)),
        ("galleries", "Galleries", galleries),
        ("problems", f"Problems ({len(problems)})",
         _table(("what", "error"), problems) if problems else '<p class="note">None.</p>'),
    ]  # fmt: skip
    title = f"lightning-chips report: {run_dir.resolve().name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body><h1>{_e(title)}</h1>'
            + ("" if render else f'<p class="hint">{_e(PLOTS_HINT)}</p>')
            + "<nav>" + "".join(f'<a href="#{key}">{_e(head)}</a>' for key, head, _ in sections) + "</nav>"
            + "".join(f'<section id="{key}"><h2>{_e(head)}</h2>{body}</section>' for key, head, body in sections)
            + "</body></html>\n")  # fmt: skip
    with atomic_writer(out, "w") as f:
        f.write(page)
    tail = f" ({len(problems)} problem{'s' if len(problems) != 1 else ''}, see the page)" if problems else ""
    print(f"[lightning-chips] report: {len(rounds)} rounds, {images} gallery images -> {out}{tail}")
    return out
