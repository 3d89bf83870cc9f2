#!/usr/bin/env python3
"""Open a vlfit report.html in headless Chromium, with the network cut off, and save a screenshot.

    python scripts/screenshot_report.py runs/demo/report [--out shot.png] [--width 1280] [--height 7000]

It shows what a reader sees: the page must render its tables and every figure from the file alone.
Needs a Chromium binary (Debian: `apt-get install chromium`). tests/test_report.py calls
`screenshot()` and is skipped where no Chromium is installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 7000, timeout: float = 120) -> Path:
    """Render `page` (a report.html, or the folder holding one) at width x height pixels into the PNG `out`."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found; install it (Debian: apt-get install chromium)")
    page = page / "report.html" if page.is_dir() else page
    if not page.is_file():
        raise FileNotFoundError(page)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vlfit-chromium-") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
            # Every host name fails to resolve: a page that needed the network would show it.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
            page.resolve().as_uri(),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    _crop_empty_bottom(out)
    return out


def _crop_empty_bottom(png: Path, margin: int = 24) -> None:
    """Cut the rows below the page's end (all equal to the window's last row) off the screenshot."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:  # cropping is cosmetic
        return
    pixels = np.asarray(Image.open(png).convert("RGB"))
    differs = np.flatnonzero((pixels != pixels[-1]).any(axis=(1, 2)))
    if len(differs) and differs[-1] + margin < len(pixels):
        Image.fromarray(pixels[: differs[-1] + margin]).save(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="report.html or the report folder")
    parser.add_argument("--out", type=Path, default=Path("report-screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=7000,
                        help="window height: the page is captured down to it, then empty space is cut off")
    args = parser.parse_args()
    try:
        print(screenshot(args.page, args.out, args.width, args.height))
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
