"""The review workstation in a real browser (issue 30): Debian's headless Chromium, driven by
Selenium through chromedriver, opens the worklist, opens a slide, sees its tiles load, clicks a
gallery cell and sees the viewer move to it, signs the slide off and finds the row in the
``reviews`` table. ``make test`` installs chromium and chromium-driver (Makefile).

With $CCS_REVIEW_SCREENSHOTS set to a folder, the three screens are saved there as PNG
(docs/review.md shows them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from smartccs.results.reviews import read_reviews
from smartccs.results.tables import read_table

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "chromium and chromium-driver are not installed: run `make test` (it installs them)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> None:
    folder = os.environ.get("CCS_REVIEW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def _slide_with_most_cells(site) -> tuple[str, str]:
    a, _ = site.centers
    rows = read_table(site.store, "slides", centers=[a]).to_pylist()
    best = max(rows, key=lambda r: (r["n_cells"] or 0, r["slide_id"]))
    return best["batch"], best["slide_id"]


def test_a_cytologist_reviews_a_slide_in_the_browser(review_site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"{review_site.base}/review/")
    wait.until(ec.visibility_of_element_located((By.ID, "token")))
    browser.find_element(By.ID, "token").send_keys(review_site.tokens["A-reviewer"])
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#slides tbody tr")) > 0)
    assert review_site.reviewer in browser.find_element(By.ID, "who").text
    _shot(browser, "worklist")

    batch, slide = _slide_with_most_cells(review_site)
    row = browser.find_element(
        By.CSS_SELECTOR, f'#slides tbody tr[data-slide="{slide}"][data-batch="{batch}"]'
    )
    row.click()
    wait.until(lambda d: d.execute_script(
        "return !!(state.viewer && state.viewer.world.getItemCount() &&"
        " state.viewer.world.getItemAt(0).getFullyLoaded())"
    ))  # fmt: skip
    tiles = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/tiles/')).length"
    )
    assert tiles > 0, "the viewer loaded its tiles from the server"
    wait.until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .cell img[src^='blob:']")) > 0
    )
    browser.find_element(By.ID, "show-heatmap").click()
    wait.until(lambda d: d.execute_script("return state.viewer.world.getItemCount()") == 2)
    assert "one scale for the slides of batch" in browser.find_element(By.ID, "heatmap-scale").text
    _shot(browser, "slide")

    before = browser.execute_script(
        "const c = state.viewer.viewport.getCenter(true); return [c.x, c.y]"
    )
    browser.find_element(By.CSS_SELECTOR, "#gallery .cell").click()
    wait.until(lambda d: d.execute_script(
        "const v = state.viewer.viewport;"
        " return Math.abs(v.getZoom(true) - v.imageToViewportZoom(1.0)) < 1e-3 * v.getZoom(true)"
    ))  # fmt: skip
    after = browser.execute_script(
        "const c = state.viewer.viewport.getCenter(true); return [c.x, c.y]"
    )
    assert after != before, "the viewer moved to the cell"

    Select(browser.find_element(By.ID, "category")).select_by_visible_text("HSIL")
    browser.find_element(By.ID, "comment").send_keys("signed in the browser test")
    browser.find_element(By.CSS_SELECTOR, "#signoff button").click()
    wait.until(lambda d: d.find_element(By.ID, "signoff-status").text == "Signed out.")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) > 0)
    _shot(browser, "signoff")

    a, _ = review_site.centers
    rows = [r for r in read_reviews(review_site.store, centers=[a]).to_pylist()
            if (r["batch"], r["slide_id"]) == (batch, slide)]  # fmt: skip
    assert rows[-1]["category"] == "HSIL" and rows[-1]["reviewer"] == review_site.reviewer
    assert rows[-1]["comment"] == "signed in the browser test"
