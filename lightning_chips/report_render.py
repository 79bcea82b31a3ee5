"""How ``lightning-chips report`` draws its page (:mod:`lightning_chips.report`): the sections of one
self-contained HTML page (inline CSS, figures and thumbnails as ``data:`` URIs, no script) from the
:class:`~lightning_chips.report_read.Summary` of each round; plots with a matplotlib ``Figure`` when matplotlib is
installed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_chips.gallery import KINDS, png_bytes
from lightning_chips.report_read import Problem, Summary

__all__ = ["CSS", "KIND_NOTES", "PLOTS_HINT", "STARVED", "render_page"]

STARVED = 0.1
"""A group is starved when its kept share is below this share of the round's overall fraction."""
PLOTS_HINT = "Plots need matplotlib: pip install 'lightning-chips[report]'"


def _png(array: np.ndarray) -> str:
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


def _settings_section(rounds: list[Summary], run_dir: Path, offline: bool, manifest: dict[str, Any]) -> str:
    sizes = sorted({r.pool_pairs for r in rounds})
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


def _scores_section(rounds: list[Summary], render: Callable | None) -> str:
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
        rows.append((r.index, r.name, f"{r.pool_pairs:,}", f"{r.size:,}", "–" if n_sel is None else f"{n_sel:,}",
                     _pct(n_sel / r.pool_pairs) if n_sel is not None and r.pool_pairs else "–", *r.stats,
                     f"{finite.min():.4g}" if len(finite) else "–", r.nonfinite, len(r.skipped),
                     len(r.shard_errors)))  # fmt: skip
    text = _figure(render, draw, (8, 4), "score histograms") if drawn else ""
    text += _table(("round", "file", "pool pairs", "scored", "selected", "selected share", "min", "median", "max",
                    "lowest selected", "NaN/inf scores", "skipped pairs", "unreadable shards"), rows)  # fmt: skip
    for r in rounds:
        if r.skipped or r.shard_errors:
            items = "".join(f"<li>{_e(line)}</li>" for line in r.shard_errors[:5] + r.skipped[:5])
            text += (f"<details open><summary>round {r.index}: {len(r.skipped)} skipped pool pairs, "
                     f"{len(r.shard_errors)} unreadable shards (first reasons)</summary>"
                     f"<ul>{items}</ul></details>")  # fmt: skip
    return text


def _overlap_section(rounds: list[Summary], render: Callable | None) -> str:
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


def _groups_section(rounds: list[Summary], render: Callable | None) -> str:
    fields = sorted({name for r in rounds for name in r.groups})
    if not fields:
        return '<p class="note">No group fields in the round files.</p>'
    text = ""
    partial = [str(r.index) for r in rounds if r.size < r.pool_pairs]
    if partial:  # candidate rounds (DataSelectionCallback(rescore=...)) score a part of the pool
        text += (f'<p class="note">Rounds {", ".join(partial)} scored a part of the pool (candidate rounds): their '
                 "pool columns count the pairs they scored.</p>")  # fmt: skip
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

        def draw(fig: Any, name: str = name, first: Summary = having[0], top: np.ndarray = top,
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


def _gallery_section(rounds: list[Summary], k: int, hint: str) -> tuple[str, int]:
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


def render_page(rounds: list[Summary], problems: list[Problem], run_dir: Path, offline: bool,
                manifest: dict[str, Any], k: int, hint: str) -> tuple[str, int]:  # fmt: skip
    """The report's HTML page and the number of gallery images on it (``k``: pairs per gallery kind; ``hint``: the
    note for rounds without a gallery)."""
    render = _plotter()
    galleries, images = _gallery_section(rounds, k, hint)
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
    return page, images
