"""The report page in a real browser (Debian's chromium through Playwright): it loads without console errors and
without a single network request, every image decodes, and each round's top gallery shows that round's top-k.

Needs ``apt-get install chromium`` and ``pip install playwright`` (no browser download: the system executable is
driven); ``LIGHTNING_CHIPS_NO_BROWSER=1`` skips these tests where neither can be installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lightning_chips.report import build_report

from .shards import write_pool
from .test_report import K, top_order, write_run, write_scores


def _chromium() -> str:
    """The system chromium; without it (or without Playwright) fail with how to install, or skip on request."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright (`pip install playwright`)")
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        missing.append("the system chromium (`apt-get install chromium`, or `bash benchmarks/setup_data.sh`)")
    if missing:
        message = f"The report's browser tests need {' and '.join(missing)}."
        if os.environ.get("LIGHTNING_CHIPS_NO_BROWSER") == "1":
            pytest.skip(message + " Skipped: LIGHTNING_CHIPS_NO_BROWSER=1.")
        pytest.fail(message + " Install them, or set LIGHTNING_CHIPS_NO_BROWSER=1 to skip these tests.")
    return path


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, tuple[Path, list]]:
    """A callback run (galleries of rounds 0 and 2 from files, round 1 read from the pool) and a score folder."""
    root = tmp_path_factory.mktemp("report_browser")
    write_pool(root / "pool", 48, 8, corrupt_image=5)
    rounds = write_run(root / "run", galleries=(0, 2))
    run = build_report(root / "run", pool=str(root / "pool"), gallery=K, thumbnail_size=32)
    scores = write_scores(root / "scores", root / "pool")
    offline = build_report(root / "scores", fraction=0.25, gallery=K, thumbnail_size=32)
    return {"run": (run, rounds), "scores": (offline, [scores])}


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


def _open(browser, path: Path) -> tuple[object, dict[str, list]]:
    """Load ``path``; return the page and what happened: console errors, failed and non-local requests."""
    page = browser.new_page()
    seen: dict[str, list] = {"console": [], "failed": [], "requests": []}
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["console"].append(str(e)))
    page.on("requestfailed", lambda r: seen["failed"].append(r.url))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, seen


@pytest.mark.parametrize("which", ["run", "scores"])
def test_the_page_loads_offline_without_errors_and_every_image_decodes(browser, pages, which):
    path, _ = pages[which]
    page, seen = _open(browser, path)
    try:
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert seen["console"] == [] and seen["failed"] == []
        foreign = [u for u in seen["requests"] if not u.startswith(("file:", "data:"))]
        assert foreign == [], foreign
        assert [u for u in seen["requests"] if u.startswith("file:")] == [path.as_uri()]  # the page itself only
        assert images and all(complete and width > 0 for complete, width, _ in images), images
        plots = page.evaluate("document.querySelectorAll('img.plot').length")
        assert plots == (4 if which == "run" else 2)  # histograms, overlap (2+ rounds), one chart per group field
    finally:
        page.close()


def test_each_rounds_top_gallery_shows_exactly_that_rounds_top_k(browser, pages):
    for which in ("run", "scores"):
        path, rounds = pages[which]
        page, _ = _open(browser, path)
        try:
            for r, arrays in enumerate(rounds):
                ids, scores = arrays["ids"], arrays["scores"]
                top = top_order(ids, scores)[:K]
                if which == "scores":  # the two highest cannot be loaded (a corrupt image, a uid no shard holds)
                    top = top[2:]
                want = [str(ids[i]) for i in top]
                shown = page.eval_on_selector_all(f'[data-kind="top"][data-round="{r}"]',
                                                  "els => els.map(e => e.dataset.id)")  # fmt: skip
                assert shown == want, (which, r)
                gallery = page.eval_on_selector_all(".gallery", "els => els.length")
                assert gallery >= 2
        finally:
            page.close()
