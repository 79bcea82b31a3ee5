"""PNG screenshot of a ``lightning-chips report`` page, taken with the system chromium through Playwright.

Needs Debian's ``chromium`` (``apt-get install chromium``, or ``bash benchmarks/setup_data.sh``) and
``pip install playwright`` (no browser download: the system executable is used).

Example::

    python benchmarks/report_screenshot.py runs/quickstart/lightning_logs/version_0/report.html docs/images/report.png
    python benchmarks/report_screenshot.py report.html top.png --width 1000 --height 1600   # only the top 1600 px
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def chromium_path() -> str:
    """The system chromium executable, or a SystemExit that says how to install it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    if path is None:
        raise SystemExit("report_screenshot: no chromium found: `apt-get install chromium` (Debian) and retry.")
    return path


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1200, height: int | None = None) -> Path:
    """Write a PNG of the page at ``html_path``: the full page, or its top ``height`` pixels.

    Example::

        >>> screenshot("report.html", "report.png", width=1200, height=1600)  # doctest: +SKIP
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("report_screenshot: Playwright is missing: `pip install playwright`.") from None
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    if not html_path.is_file():
        raise SystemExit(f"report_screenshot: {html_path} does not exist: run `lightning-chips report RUN_DIR` first.")
    if width < 200 or (height is not None and height < 100):
        raise SystemExit(f"report_screenshot: --width must be >= 200 and --height >= 100, got {width}, {height}.")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height or 900})
            page.goto(html_path.as_uri(), wait_until="load")
            page.screenshot(path=str(png_path), full_page=height is None)
        finally:
            browser.close()
    return png_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="PNG screenshot of a lightning-chips report page (system chromium).")
    parser.add_argument("html", help="the report page, e.g. RUN_DIR/report.html")
    parser.add_argument("png", help="the PNG to write, e.g. docs/images/report.png")
    parser.add_argument("--width", type=int, default=1200, help="viewport width in pixels (default 1200)")
    parser.add_argument("--height", type=int, default=None,
                        help="capture only the top HEIGHT pixels (default: the full page)")  # fmt: skip
    args = parser.parse_args(argv)
    out = screenshot(args.html, args.png, width=args.width, height=args.height)
    print(f"report_screenshot: {out}", file=sys.stdout)


if __name__ == "__main__":
    main()
