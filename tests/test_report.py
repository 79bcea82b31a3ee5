"""``lightning-chips report``: the page over a run's round files (or a score folder) shows what the files hold.

Fixture runs are written here with numpy in the round-file format (ids, scores, selected, groups, skipped pairs,
gallery files) over a tiny WebDataset pool, so every expectation (top-k ids, overlaps, starved groups) is computed
from the fixture's own arrays, independently of the report's code.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_chips.report import NO_GALLERY, PLOTS_HINT, build_report, load_rounds

from .shards import write_pool

K = 4
FRACTION = 0.25
DOMAINS = np.array(["photo", "sketch", "clipart"])
SETTINGS = json.dumps({"callback": {"fraction": FRACTION, "every_n_epochs": 1}, "scorer": {"sketch_dim": 512}})


# --- fixtures: a pool, round files, gallery files, a score folder -------------------------------------------------
@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[bool, tuple[Path, dict]]:
    """{string_ids: (shard folder, valid pairs by uid)}; pair 5 has an undecodable image."""
    root = tmp_path_factory.mktemp("report_pools")
    return {s: (root / f"pool-{s}", write_pool(root / f"pool-{s}", 48, 8, corrupt_image=5, string_uids=s))
            for s in (False, True)}  # fmt: skip


def all_uids(string_ids: bool) -> np.ndarray:
    uids = [10**12 + i for i in range(48)]
    return np.array(sorted(f"u-{u}" for u in uids)) if string_ids else np.array(uids, dtype=np.int64)


def top_order(ids: np.ndarray, scores: np.ndarray) -> list[int]:
    """Row indices by score descending, ties by id ascending (written independently of the report)."""
    return sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i].item()))


def gallery_rows(ids, scores, selected, previous) -> dict[str, list[int]]:
    order = top_order(ids, scores)
    rows = {"top": order[:K], "bottom": order[::-1][:K]}
    if previous is not None:
        rows["entered"] = [i for i in order if selected[i] and not previous[i]][:K]
        rows["left"] = [i for i in order[::-1] if previous[i] and not selected[i]][:K]
    return rows


def write_run(folder: Path, string_ids: bool = False, galleries: tuple[int, ...] = (0, 2), seed: int = 0) -> list:
    """Three rounds over the 48 pool uids, the top 12, 12 and 9 selected; ``clipart`` pairs score lowest (starved)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = all_uids(string_ids)
    domain = (np.arange(48) % 3).astype(np.int32)
    half = (np.arange(48) % 2).astype(np.int32)
    rounds, previous = [], None
    for r, budget in enumerate((12, 12, 9)):  # round 2 keeps fewer: the overlap is not symmetric
        scores = (rng.normal(size=48) - 10.0 * (domain == 2)).astype(np.float32)
        selected = np.zeros(48, bool)
        selected[top_order(ids, scores)[:budget]] = True
        arrays = {"ids": ids, "scores": scores, "selected": selected, "round": np.asarray(r),
                  "method": np.asarray("CHIPS"), "fraction": np.asarray(FRACTION), "settings": np.asarray(SETTINGS),
                  "group_fields": np.array(["domain", "half"]), "group_values_0": DOMAINS, "group_codes_0": domain,
                  "group_values_1": np.array(["even", "odd"]), "group_codes_1": half,
                  "bad_ids": np.array([], dtype=ids.dtype), "bad_reasons": np.array([], dtype=str)}  # fmt: skip
        if r == 1:
            arrays["bad_ids"] = np.array(["", "u-7"]) if string_ids else np.array([np.iinfo(np.int64).min, 7])
            arrays["bad_reasons"] = np.array(["missing uid (no json member)", "undecodable image: not a PNG"])
            arrays["bad_keys"] = np.array(["s000100", "s000101"])
            arrays["unreadable_shards"] = np.array(["pool-000009.tar"])
            arrays["shard_errors"] = np.array(["truncated or unreadable after 3 samples"])
        np.savez(folder / f"round_{r:04d}.npz", **arrays)
        if r in galleries:
            rows = gallery_rows(ids, scores, selected, previous)
            flat = [(kind, i) for kind, found in rows.items() for i in found]
            missing = ["999"] if r == 2 else []
            np.savez(folder / f"round_{r:04d}_gallery.npz", ids=ids[[i for _, i in flat]],
                     kinds=np.array([kind for kind, _ in flat]), scores=scores[[i for _, i in flat]],
                     captions=np.array([f"<b>caption</b> & {ids[i]}" for _, i in flat]),
                     thumbnails=rng.integers(0, 256, (len(flat), 16, 16, 3), dtype=np.uint8),
                     missing_ids=np.array(missing, dtype=str),
                     missing_reasons=np.array(["undecodable image (test)"] * len(missing), dtype=str))  # fmt: skip
        rounds.append({"ids": ids, "scores": scores, "selected": selected, "domain": domain, "previous": previous})
        previous = selected
    return rounds


def write_scores(folder: Path, pool: Path, string_ids: bool = False, seed: int = 1) -> dict:
    """A `lightning-chips score` folder over ``pool``: the corrupt pair 5 scores highest, a uid that no shard
    holds second; the manifest names the shards relative to the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    raw = [10**12 + i for i in range(48)] + [10**12 + 999]
    ids = np.array([f"u-{u}" for u in raw]) if string_ids else np.array(raw, dtype=np.int64)
    scores = rng.normal(size=49).astype(np.float32)
    scores[5], scores[48] = 10.0, 9.0
    order = np.argsort(ids, kind="stable")
    ids, scores = ids[order], scores[order]
    domain = np.array([int(str(u)[-1]) % 3 for u in ids], dtype=np.int32)
    np.savez(folder / "scores.npz", ids=ids, scores=scores, method=np.asarray("CLIPScore"),
             scorer=np.asarray(json.dumps({"name": "clipscore"})), group_fields=np.array(["domain"]),
             group_values_0=DOMAINS, group_codes_0=domain)  # fmt: skip
    shards = sorted(os.path.relpath(p, folder) for p in pool.glob("*.tar"))
    manifest = {"pool": shards, "uid_field": "uid", "scored": 49, "skipped": 1, "shards": {s: {} for s in shards}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {"ids": ids, "scores": scores, "domain": domain}


# --- reading the page ---------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Sections, table rows (with their top-level section and class) and gallery items of a report page."""

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.text = path.read_text("utf-8")
        self.sections: list[str] = []
        self.rows: list[dict] = []
        self.items: list[dict] = []
        self.images: list[dict] = []
        self._stack: list[str] = []
        self._row = self._cell = self._item = None
        self.feed(self.text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self._stack.append(a.get("id", ""))
            self.sections.append(a.get("id", ""))
        elif tag == "tr":
            self._row = {"class": a.get("class", ""), "cells": [], "section": self._stack[0] if self._stack else ""}
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
            if self._item is not None:
                self._item["src"] = a["src"]
        elif "data-kind" in a:
            self._item = {**a, "text": []}

    def handle_endtag(self, tag):
        if tag == "section":
            self._stack.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "figure" and self._item is not None:
            self.items.append({**self._item, "text": "".join(self._item["text"])})
            self._item = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._item is not None:
            self._item["text"].append(data)

    def ids(self, kind: str, round_index: int) -> list[str]:
        return [i["data-id"] for i in self.items if i["data-kind"] == kind and i["data-round"] == str(round_index)]

    def table(self, section: str) -> list[list[str]]:
        return [row["cells"] for row in self.rows if row["section"] == section]

    def problems(self) -> str:
        return "\n".join(" | ".join(cells) for cells in self.table("problems"))


def shown(ids: np.ndarray, rows: list[int]) -> list[str]:
    return [str(ids[i]) for i in rows]


# --- tests ----------------------------------------------------------------------------------------------------------
def test_the_page_holds_settings_statistics_overlap_and_a_section_per_round(tmp_path, capsys):
    rounds = write_run(tmp_path / "run")
    out = build_report(tmp_path / "run", gallery=K)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == tmp_path / "run" / "report.html"
    assert re.fullmatch(rf"\[lightning-chips\] report: 3 rounds, \d+ gallery images -> {re.escape(str(out))} "
                        r"\(1 problem, see the page\)", line), line  # fmt: skip
    page = Page(out)
    assert {"settings", "scores", "overlap", "groups", "galleries", "problems"} <= set(page.sections)
    assert {"round-0", "round-1", "round-2"} <= set(page.sections)
    settings = dict((cells[0], cells[1]) for cells in page.table("settings"))
    assert settings["method"] == "CHIPS" and settings["fraction"] == "0.25" and settings["pool size"] == "48"
    assert settings["rounds"].startswith("3") and settings["group fields"] == "domain, half"
    assert '"sketch_dim": 512' in html.unescape(page.text)  # the settings JSON, pretty-printed
    assert "<h3>settings</h3>" not in page.text and "callback" in settings  # one table: the run's and the JSON's
    stats = page.table("scores")[1:]
    assert [row[4] for row in stats] == ["12", "12", "9"]  # selected per round (after pool pairs, scored)
    assert [row[-2:] for row in stats] == [["0", "0"], ["2", "1"], ["0", "0"]]  # skipped pairs, unreadable shards
    assert "undecodable image: not a PNG" in page.text and "truncated or unreadable after 3 samples" in page.text
    overlap = page.table("overlap")[1:]
    for i, a in enumerate(rounds):
        for j, b in enumerate(rounds):
            expected = (a["selected"] & b["selected"]).sum() / a["selected"].sum()
            assert overlap[i][1 + j] == f"{expected:.3f}", (i, j)
    assert "<b>caption</b>" not in page.text and "&lt;b&gt;caption&lt;/b&gt; &amp;" in page.text  # escaped
    assert "<script" not in page.text and not re.search(r"""(src|href)=["']?(https?:|//)""", page.text)
    assert sorted(os.listdir(out.parent)) == sorted(
        [*(f"round_{r:04d}.npz" for r in range(3)), "round_0000_gallery.npz", "round_0002_gallery.npz", "report.html"]
    )  # written atomically: no temporary file is left
    if importlib.util.find_spec("matplotlib") is not None:
        plots = [img for img in page.images if img.get("class") == "plot"]
        assert len(plots) == 4  # score histograms, overlap heatmap, one bar chart per group field
        assert all(img["src"].startswith("data:image/png;base64,") for img in plots)
        assert PLOTS_HINT not in page.text


@pytest.mark.parametrize("string_ids", [False, True], ids=["int-ids", "string-ids"])
def test_galleries_show_each_rounds_top_bottom_entered_and_left_and_pool_reads_fill_the_rest(tmp_path, pools,
                                                                                              string_ids):  # fmt: skip
    shards, pairs = pools[string_ids]
    rounds = write_run(tmp_path / "run", string_ids=string_ids, galleries=(0, 2))
    page = Page(build_report(tmp_path / "run", pool=str(shards), gallery=K, thumbnail_size=24))
    for r, arrays in enumerate(rounds):
        expected = gallery_rows(arrays["ids"], arrays["scores"], arrays["selected"], arrays["previous"])
        for kind in ("top", "bottom", "entered", "left"):
            want = [uid for uid in shown(arrays["ids"], expected.get(kind, [])) if r != 1 or uid != str(all_uids(
                string_ids)[5])]  # fmt: skip
            assert page.ids(kind, r) == want, (r, kind)
    assert page.ids("entered", 1) and page.ids("left", 1)  # round 1 was read from the pool
    for item in (i for i in page.items if i["data-round"] == "1"):  # thumbnails and captions from the shards
        uid = int(item["data-id"]) if not string_ids else item["data-id"]
        assert pairs[uid]["text"] in item["text"]
        image = Image.open(io.BytesIO(base64.b64decode(item["src"].split(",", 1)[1])))
        assert image.size == (24, 24)
    assert NO_GALLERY not in page.text


def test_unreadable_round_files_are_problems_and_the_other_rounds_are_still_shown(tmp_path, capsys):
    write_run(tmp_path / "run")
    (tmp_path / "run" / "round_0001.npz").write_bytes(b"PK\x03\x04 this is not a zip file")
    np.savez(tmp_path / "run" / "round_0003.npz", ids=np.arange(3), scores=np.zeros(3, np.float32))
    np.savez(tmp_path / "run" / "round_0004.npz", ids=np.arange(3), scores=np.zeros(2, np.float32),
             selected=np.ones(3, bool))  # fmt: skip
    (tmp_path / "run" / "round_0002_gallery.npz").write_bytes(b"garbage")
    out = build_report(tmp_path / "run", tmp_path / "elsewhere" / "page.html")
    assert "2 rounds" in capsys.readouterr().out and out == tmp_path / "elsewhere" / "page.html"
    page = Page(out)
    assert {"round-0", "round-2"} <= set(page.sections) and not {"round-1", "round-3", "round-4"} & set(page.sections)
    problems = {row[0]: row[1] for row in page.table("problems")[1:]}
    assert set(problems) == {"round_0001.npz", "round_0003.npz", "round_0004.npz", "round_0002_gallery.npz"}
    assert "selected" in problems["round_0003.npz"] and "3, 2, 3" in problems["round_0004.npz"]
    assert page.ids("top", 0) and not page.ids("top", 2)  # round 2 is shown without its damaged gallery
    rounds, found = load_rounds(tmp_path / "run")
    assert [r.index for r in rounds] == [0, 2] and len(found) == 4


def test_gallery_pairs_that_could_not_be_loaded_are_listed_and_a_missing_gallery_is_said_once(tmp_path):
    write_run(tmp_path / "run", galleries=(2,))
    page = Page(build_report(tmp_path / "run"))
    assert "round 2 gallery pair 999 | undecodable image (test)" in page.problems()
    assert page.text.count(NO_GALLERY) == 1
    assert not page.ids("top", 0) and page.ids("top", 2)


def test_a_group_with_almost_no_selection_is_marked_starved(tmp_path):
    rounds = write_run(tmp_path / "run")
    page = Page(build_report(tmp_path / "run", gallery=0))
    expected, marked = set(), set()
    for r, arrays in enumerate(rounds):
        overall = arrays["selected"].mean()
        for code, value in enumerate(DOMAINS):
            members = arrays["domain"] == code
            if (arrays["selected"] & members).sum() / members.sum() < 0.1 * overall:
                expected.add((str(r), str(value)))
    for row in (row for row in page.rows if row["section"] == "groups"):
        if "starved" in row["class"].split():
            assert row["cells"][-1] == "starved"
            marked.add((row["cells"][0], row["cells"][1]))
        elif row["cells"][0].isdigit():
            assert row["cells"][-1] == ""
    assert expected == marked and {("0", "clipart"), ("1", "clipart"), ("2", "clipart")} <= marked
    # at the threshold: 100 selected of 400 (fraction 0.25), kept 2 % < 2.5 % is starved, 3 % is not
    codes = np.repeat(np.arange(4, dtype=np.int32), 100)
    selected = np.zeros(400, bool)
    for code, count in enumerate((95, 3, 2, 0)):
        selected[code * 100 : code * 100 + count] = True
    (tmp_path / "edge").mkdir()
    np.savez(tmp_path / "edge" / "round_0000.npz", ids=np.arange(400), scores=np.linspace(1, 0, 400, dtype=np.float32),
             selected=selected, group_fields=np.array(["g"]), group_values_0=np.array(["most", "few", "rare", "none"]),
             group_codes_0=codes)  # fmt: skip
    page = Page(build_report(tmp_path / "edge", gallery=0))
    rows = {row["cells"][1]: row for row in page.rows if row["section"] == "groups" and row["cells"][0] == "0"}
    assert {value for value, row in rows.items() if row["class"] == "starved"} == {"rare", "none"}
    assert rows["few"]["cells"][-2:] == ["3.0 %", ""] and rows["rare"]["cells"][-2:] == ["2.0 %", "starved"]


@pytest.mark.parametrize("string_ids", [False, True], ids=["int-ids", "string-ids"])
def test_a_score_folder_gets_its_top_k_from_the_manifests_pool(tmp_path, pools, string_ids):
    shards, pairs = pools[string_ids]
    arrays = write_scores(tmp_path / "scores", shards, string_ids)
    page = Page(build_report(tmp_path / "scores", gallery=5, thumbnail_size=20))
    ids, scores = arrays["ids"], arrays["scores"]
    order = shown(ids, top_order(ids, scores))
    broken, absent = order[0], order[1]  # the corrupt image, the uid no shard holds
    assert page.ids("top", 0) == order[2:5]  # the 5 highest minus the two that could not be loaded
    assert page.ids("bottom", 0) == order[::-1][:5]
    assert not page.ids("entered", 0) and not page.ids("left", 0)
    problems = page.problems()
    assert f"gallery pair {broken} (top) | undecodable image" in problems
    assert f"gallery pair {absent} (top) | not found in the 6 pool shards" in problems
    for item in page.items:
        assert pairs[item["data-id"] if string_ids else int(item["data-id"])]["text"] in item["text"]
    stats = page.table("scores")[1]
    assert stats[4] == "–" and "needs two or more rounds" in page.text  # no selection in a score folder
    assert page.table("groups")[0] == ["round", "domain", "pool pairs", "pool share"]


def test_a_score_folder_with_a_selection_file_or_a_fraction(tmp_path, pools):
    shards, _ = pools[False]
    arrays = write_scores(tmp_path / "scores", shards)
    ids, scores, domain = arrays["ids"], arrays["scores"], arrays["domain"]
    top = top_order(ids, scores)[:12]  # round(0.25 * 49) = 12
    page = Page(build_report(tmp_path / "scores", tmp_path / "fraction.html", fraction=0.25, gallery=0))
    assert page.table("scores")[1][4] == "12"
    groups = {row[1]: int(row[4]) for row in page.table("groups")[1:]}
    assert groups == {v: int((domain[top] == c).sum()) for c, v in enumerate(DOMAINS) if (domain == c).any()}

    chosen = np.concatenate([ids[[0, 3, 7]], [123]])
    np.save(tmp_path / "subset.npy", chosen)
    page = Page(build_report(tmp_path / "scores", tmp_path / "selection.html", selection=tmp_path / "subset.npy"))
    assert page.table("scores")[1][4] == "3"
    assert "subset.npy | 1 selected ids are not in scores.npz" in page.problems()
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="string ids"):
        build_report(tmp_path / "scores", selection=tmp_path / "strings.npy")


def test_a_score_folder_whose_pool_moved_still_gets_its_page_and_says_where_to_point_pool(tmp_path, pools):
    shards, _ = pools[False]
    write_scores(tmp_path / "scores", shards)
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    (tmp_path / "scores" / "manifest.json").write_text(json.dumps({**manifest, "pool": ["../moved/pool-000000.tar"]}))
    page = Page(build_report(tmp_path / "scores"))
    assert "manifest.json pool" in page.problems() and "--pool" in page.problems()
    assert html.unescape(page.text).count("No gallery: pass --pool") == 1 and not page.items
    page = Page(build_report(tmp_path / "scores", pool=str(shards), gallery=3))  # --pool overrides the manifest
    assert len(page.ids("top", 0)) == 1 and "manifest.json pool" not in page.problems()  # 2 of the top 3 fail


def test_bad_arguments_are_clear_value_errors_before_anything_is_written(tmp_path, pools):
    write_run(tmp_path / "run")
    shards, _ = pools[False]
    write_scores(tmp_path / "scores", shards)
    cases = [
        ((tmp_path / "empty",), {}, "not a folder"),
        ((tmp_path / "run",), {"fraction": 0.3}, "hold their own selection"),
        ((tmp_path / "scores",), {"fraction": 0.3, "selection": tmp_path / "s.npy"}, "not both"),
        ((tmp_path / "scores",), {"fraction": 1.5}, r"\(0, 1\]"),
        ((tmp_path / "scores",), {"selection": tmp_path / "none.npy"}, "No selection file"),
        ((tmp_path / "run",), {"gallery": -1}, "gallery"),
        ((tmp_path / "run",), {"thumbnail_size": 0}, "thumbnail_size"),
        ((tmp_path / "run",), {"pool": str(tmp_path / "no-such-shard.tar")}, "--pool"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            build_report(*args, **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="round_0000.npz.*scores.npz"):
        build_report(tmp_path / "empty")
    assert not (tmp_path / "run" / "report.html").exists() and not (tmp_path / "scores" / "report.html").exists()


def test_without_matplotlib_the_page_keeps_its_tables_and_says_how_to_get_the_plots(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    write_run(tmp_path / "run")
    page = Page(build_report(tmp_path / "run"))
    text = html.unescape(page.text)
    assert text.count(PLOTS_HINT) == 1 and "pip install 'lightning-chips[report]'" in text
    assert not [img for img in page.images if img.get("class") == "plot"]
    assert len(page.table("overlap")) == 4 and page.table("groups") and page.ids("top", 0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_chips", "report", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_command_line_writes_the_page_of_a_log_folder_and_a_bad_run_dir_is_one_line(tmp_path):
    write_run(tmp_path / "version_0" / "selection")  # a Lightning log folder: the rounds are in selection/
    result = _cli(str(tmp_path / "version_0"), "--gallery", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "version_0" / "report.html"
    line = result.stdout.strip().splitlines()[-1]
    expected = rf"\[lightning-chips\] report: 3 rounds, 12 gallery images -> {re.escape(str(out))} \(1 problem, see"
    assert re.fullmatch(expected + r" the page\)", line), line
    assert Page(out).ids("top", 2)
    shutil.rmtree(tmp_path / "version_0" / "selection")
    bad = _cli(str(tmp_path / "version_0"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("lightning-chips report: error:")]
    assert len(errors) == 1 and "round_0000.npz" in errors[0] and "scores.npz" in errors[0], bad.stderr
    assert "--verbose" in bad.stderr
