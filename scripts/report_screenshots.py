"""Screenshots of a report for the README: ``python scripts/report_screenshots.py runs/demo/report docs``.

Needs Debian's chromium and the ``playwright`` Python package (both installed by ``make test``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PAGES = {"report-index.png": "index.html", "report-target.png": "targets/1.html",
         "report-self-influence.png": "self_influence.html"}


def main() -> None:
    report, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        for name, path in PAGES.items():
            page.goto((report / path).resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=out / name)
            print(out / name)
        browser.close()


if __name__ == "__main__":
    main()
