"""The search page in a real browser: Debian's headless Chromium, driven by Playwright, against
the real `cmhash serve` on the tiny index (test_serve's fixtures). Skipped, with the reason, where
Chromium or Playwright is missing (.ci/run installs both)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_serve import live_server, served

FIXTURES = (live_server, served)  # test_serve's, found here by pytest under these names

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no Chromium at /usr/bin/chromium: apt-get install chromium (.ci/run does)"),
]


@pytest.fixture
def page(live_server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # a fresh temporary profile
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.set_default_timeout(30_000)
        page.goto(live_server)
        yield page
        browser.close()


def test_search_by_caption_and_by_image_in_the_browser(page, tmp_path):
    expect = sync_api.expect
    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("random-init CLIP")
    expect(page.locator("#info")).to_contain_text("60 items · 16-bit codes")

    page.fill("#k", "7")
    page.fill("#text", "a red circle")
    page.click("#text-submit")
    cards = page.locator("#grid .result")
    expect(cards).to_have_count(7)
    expect(page.locator("#summary")).to_contain_text("k = 7 · 16-bit codes")
    for i in range(7):
        expect(cards.nth(i).locator(".rank")).to_have_text(f"#{i + 1}")
        expect(cards.nth(i).locator(".distance")).to_have_text(re.compile(r"^distance \d+$"))
        expect(cards.nth(i).locator(".labels")).to_contain_text("labels: ")
    page.wait_for_function("[...document.querySelectorAll('#grid img')].every(img => img.complete && img.naturalWidth > 0)")
    page.screenshot(path=tmp_path / "text-query.png", full_page=True)

    # "more like this" on the third image: the images nearest to its caption's code, as the API answers
    third_id = cards.nth(2).locator(".id").inner_text()
    href = cards.nth(2).locator("a.similar").get_attribute("href")
    assert href.endswith("/similar?target=image&k=7")
    expected = [r["id"] for r in page.request.get(page.url + href).json()["results"]]
    cards.nth(2).locator("a.similar").click()
    expect(page.locator("#summary")).to_contain_text(f'7 nearest images to the caption of item "{third_id}"')
    expect(cards.locator(".id")).to_have_text(expected)

    page.set_input_files("#file", "stages/prepare/images/000003.png")
    captions = page.locator("#captions .result")
    expect(captions).to_have_count(7)
    expect(page.locator("#grid .result")).to_have_count(0)
    expect(captions.first.locator(".caption")).not_to_be_empty()
    expect(captions.first.locator(".distance")).to_have_text(re.compile(r"^distance \d+$"))
    expect(page.locator("#query-image")).to_be_visible()
    page.screenshot(path=tmp_path / "image-query.png", full_page=True)
    captions.first.locator("a.similar").click()  # the captions nearest to that caption's image code
    expect(page.locator("#summary")).to_contain_text("7 nearest captions to the image of item")
    expect(captions).to_have_count(7)
    expect(page.locator("#query-image")).to_be_hidden()
    assert (tmp_path / "text-query.png").stat().st_size > 10_000 and (tmp_path / "image-query.png").stat().st_size > 10_000
    assert page.errors == []


def test_errors_show_on_the_page_and_text_stays_text(page, tmp_path):
    expect = sync_api.expect
    page.fill("#text", "   ")
    page.click("#text-submit")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_have_text("text is empty (nothing but whitespace or control characters)")

    (tmp_path / "notes.png").write_text("not a picture")
    page.set_input_files("#file", tmp_path / "notes.png")
    expect(page.locator("#error")).to_contain_text("cannot read image notes.png")

    page.fill("#k", "500")
    page.fill("#text", "a ring")
    page.click("#text-submit")
    expect(page.locator("#error")).to_have_text("k must be at most 100 (got 500)")

    attack = '<img src=x onerror="window.pwned=1"><b>bold</b>'
    page.fill("#k", "3")
    page.fill("#text", attack)
    page.click("#text-submit")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#summary")).to_contain_text(attack)  # shown as the characters typed
    assert page.locator("#summary b, #summary img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.errors == []
