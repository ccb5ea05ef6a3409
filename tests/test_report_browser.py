"""The report in a real browser with the network blocked (Debian's headless Chromium, driven by
Playwright, as tests/test_browser.py): every chart drawn, a panel at a time, and no request for
anything but the page itself. And DVC's own plots page, made with the report's offline template:
its vega plots and image plots draw offline too. Skipped, with the reason, without Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser import CHROMIUM, FLAGS
from test_report import tiny_run

FIXTURES = (tiny_run,)  # test_report's, found here by pytest under its name
REPO = Path(__file__).resolve().parents[1]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no Chromium at /usr/bin/chromium: apt-get install chromium (.ci/run does)"),
]


@pytest.fixture
def offline_page():
    """open(path) -> the page, loaded with every request that is not a local file aborted; the
    page's `requests` lists every URL it asked for, `errors` its script errors."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.requests, page.errors = [], []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))

        def route(r):
            page.requests.append(r.request.url)
            r.continue_() if r.request.url.startswith("file://") else r.abort()

        page.route("**/*", route)
        page.set_default_timeout(60_000)

        def open_file(path: Path):
            page.goto(path.resolve().as_uri())
            return page

        yield open_file
        browser.close()


# JS: per panel of each chart (the groups of a facet's cells), does it hold a drawn line / rule?
PANELS = """el => [...el.querySelectorAll('g.cell > g')].map(cell => ({
  lines: [...cell.querySelectorAll('.mark-line path')].filter(p => (p.getAttribute('d') || '').includes('L')).length,
  rules: cell.querySelectorAll('.mark-rule line').length}))"""


def test_every_chart_of_the_report_draws_offline(tiny_run, offline_page):
    root, _ = tiny_run
    page = offline_page(root / "stages/report/index.html")
    page.wait_for_function("[...document.querySelectorAll('div.chart')].every(el => el.dataset.drawn)")
    charts = page.locator("div.chart")
    # MAP@50 and MAP@all, PR, P@N: protocol x direction; fusion: loss, val MAP, lr; hash: those x 2 code lengths
    expected = [4, 4, 4, 4, 3, 6]
    assert charts.count() == len(expected)
    for i, n in enumerate(expected):
        panels = charts.nth(i).evaluate(PANELS)
        assert len(panels) == n, (i, panels)
        assert all(p["lines"] >= 1 for p in panels), (i, panels)
        if i >= 4:  # the training charts mark the kept epoch in every panel
            assert all(p["rules"] >= 1 for p in panels), (i, panels)
    sync_api.expect(page.locator("#banner")).to_contain_text("random-init CLIP")
    assert page.errors == []
    assert page.requests == [(root / "stages/report/index.html").resolve().as_uri()]


def test_dvc_plots_show_draws_offline_with_the_report_template(tiny_run, offline_page, tmp_path):
    root, _ = tiny_run
    work = tmp_path / "work"  # a DVC project of the tiny run's files and the repository's plot definitions
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("checkpoints"))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, check=True)
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(REPO / ".dvc/plots", work / ".dvc/plots")
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--html-template", "stages/report/dvc-plots.html", "-o", "dvc_plots"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    html = (work / "dvc_plots/index.html").read_text()
    assert "cdn.jsdelivr.net/npm/vega@" not in html  # DVC's CDN script tags left out

    page = offline_page(work / "dvc_plots/index.html")
    images = page.locator("img")
    assert images.count() == 4  # plots/*.svg
    page.wait_for_function("[...document.images].every(img => img.complete && img.naturalWidth > 0)")
    plots = page.locator("div.vega-embed")
    assert plots.count() >= 4  # dvclive curves and the evaluate curves
    page.wait_for_function("[...document.querySelectorAll('div.vega-embed')].every(el => el.querySelector('canvas, svg'))")
    # each plot's marks: drawn paths in its SVG, or inked pixels where vega-embed chose a canvas
    drawn = page.evaluate("""[...document.querySelectorAll('div.vega-embed')].map(el => {
        const c = el.querySelector('canvas');
        if (c) { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 let ink = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) ink++; return ink; }
        return [...el.querySelectorAll('svg .role-mark path')].filter(p => (p.getAttribute('d') || '').length > 10).length; })""")
    assert len(drawn) == plots.count() and all(n > 0 for n in drawn), drawn
    assert page.errors == []
    assert all(url.startswith("file://") for url in page.requests), page.requests
