"""The HTML report: a self-contained folder whose links and images resolve, checked on disk and in Chromium."""

from __future__ import annotations

import csv
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cliptrace.trak.settings import AttributionSettings
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.report import build_report
from cliptrace.train import TrainConfig, train

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    """A 60-image shapes world with planted items, a 2-checkpoint tiny run on it, and its report."""
    root = tmp_path_factory.mktemp("report")
    world = generate_shapes_world(root / "world", n_images=60, seed=5, n_duplicates=3, n_mislabeled=3, image_size=32)
    train(TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32, vocab_size=300, epochs=2,
                      batch_size=8, warmup_steps=1, save_every=1, progress=False))
    summary = build_report(root / "run", n_targets=5, settings=AttributionSettings(proj_dim=64, bank_size=16, batch_size=8), top_k=4,
                           self_influence_top=10, progress=False, methods=("decomposition", "integrated_gradients"))
    return root, summary


class Links(HTMLParser):
    """Collects ``src`` and ``href`` attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def test_every_link_and_image_resolves_inside_the_folder(report):
    root, summary = report
    folder = summary.index.parent
    pages = sorted(folder.rglob("*.html"))
    assert {page.relative_to(folder).as_posix() for page in pages} >= {
        "index.html", "targets-1.html", "self_influence.html", *(f"targets/{n}.html" for n in range(1, 9))}
    for page in pages:
        parser = Links()
        parser.feed(page.read_text(encoding="utf-8"))
        assert parser.links, page
        for link in parser.links:
            assert "://" not in link and not link.startswith("/"), f"{page}: {link} leaves the folder"
            assert (page.parent / link).resolve().is_file(), f"{page}: {link} is missing"
    assert not (folder.parent / "report.partial").exists()


def test_targets_and_planted_counts_agree_with_the_saved_attribution(report):
    root, summary = report
    attribution = summary.index.parent / "attribution"
    planted = summary.planted
    assert summary.n_targets == 3 + 5  # the originals of the 3 planted duplicates, then 5 test images
    with (attribution / "topk.csv").open() as file:
        rows = list(csv.DictReader(file))
    with (attribution / "self_influence.csv").open() as file:
        influence = list(csv.DictReader(file))
    import json

    plan = json.loads((root / "world" / "planted.json").read_text())
    top1 = {row["target_id"]: row["train_id"] for row in rows if row["kind"] == "proponent" and row["rank"] == "1"}
    expected_top1 = sum(top1[item["original"]] == item["duplicate"] for item in plan["duplicates"])
    most_influential = {row["train_id"] for row in influence[:10]}
    expected_mislabeled = sum(item["id"] in most_influential for item in plan["mislabeled"])
    assert (planted.duplicates_total, planted.duplicates_top1) == (3, expected_top1)
    assert (planted.mislabeled_total, planted.mislabeled_found) == (3, expected_mislabeled)
    index = summary.index.read_text(encoding="utf-8")
    assert f"{expected_top1} / 3" in index and f"{expected_mislabeled} / 3" in index


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it where apt-get can run)")
def test_report_in_headless_chromium(report):
    """The page loads without console errors, every image decodes, and target navigation works."""
    from playwright.sync_api import sync_playwright

    _, summary = report
    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
            for name in ("index.html", "self_influence.html", "targets-1.html"):
                page.goto((summary.index.parent / name).as_uri())
                page.wait_for_load_state("load")
                assert_images_decode(page)
            page.screenshot(path=ARTIFACTS / "report-targets.png", full_page=True)
            page.locator("a.target-link").first.click()
            page.wait_for_load_state("load")
            assert page.url.endswith("/targets/1.html")
            assert page.locator("h1").inner_text().startswith("Target 1:")
            assert_images_decode(page)
            page.screenshot(path=ARTIFACTS / "report-target.png", full_page=True)
            page.get_by_text("next →").click()
            page.wait_for_load_state("load")
            assert page.url.endswith("/targets/2.html")
        finally:
            browser.close()
    assert errors == []


def assert_images_decode(page) -> None:
    sizes = page.eval_on_selector_all("img", "images => images.map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert sizes, f"{page.url} has no images"
    broken = [src for src, width in sizes if width == 0]
    assert broken == [], f"{page.url}: images that do not decode: {broken}"
