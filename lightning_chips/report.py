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

Round files are read one at a time into a :class:`~lightning_chips.report_read.Round` and summarised
(:mod:`lightning_chips.report_read`: the page holds one round's arrays plus every round's selected ids), then drawn
as one page (:mod:`lightning_chips.report_render`); this module checks the arguments and ties the two.

Example::

    >>> build_report("lightning_logs/version_0")  # doctest: +SKIP
    [lightning-chips] report: 3 rounds, 96 gallery images -> lightning_logs/version_0/report.html
    >>> build_report("scores/chips", fraction=0.3, pool="pool/{000000..000099}.tar", out="chips.html")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_chips.gallery import KINDS
from lightning_chips.io import READ_ERRORS, atomic_writer
from lightning_chips.report_read import (
    Problem,
    Round,
    Summary,
    fill_galleries,
    load_rounds,
    manifest_damage,
    read_round,
    round_sources,
    select_offline,
    summarize,
)
from lightning_chips.report_render import PLOTS_HINT, render_page

__all__ = ["KINDS", "NO_GALLERY", "PLOTS_HINT", "Round", "build_report", "load_rounds"]

NO_GALLERY = "No gallery saved for this round (set `gallery=K` on DataSelectionCallback, or pass --pool)"


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
    offline, files = round_sources(run_dir)
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
        except READ_ERRORS as exc:
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
    skipped, shard_errors = manifest_damage(manifest, problems) if offline else ([], [])
    rounds: list[Summary] = []
    for index, path in files:  # one round's arrays at a time
        r = read_round(index, path, offline, problems)
        if r is not None and offline:
            select_offline(r, chosen, fraction, selection, problems)
            r.skipped, r.shard_errors = skipped, shard_errors
        if r is not None:
            rounds.append(summarize(r, rounds[-1] if rounds else None, gallery))
    if gallery and urls:
        fill_galleries(rounds, urls, uid_field, thumbnail_size, problems)

    hint = "No gallery: pass --pool (the score manifest names no readable pool)" if offline else NO_GALLERY
    page, images = render_page(rounds, problems, run_dir, offline, manifest, gallery, hint)
    with atomic_writer(out, "w") as f:
        f.write(page)
    tail = f" ({len(problems)} problem{'s' if len(problems) != 1 else ''}, see the page)" if problems else ""
    print(f"[lightning-chips] report: {len(rounds)} rounds, {images} gallery images -> {out}{tail}")
    return out
