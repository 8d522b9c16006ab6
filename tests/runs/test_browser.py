"""report.html and index.html in a real browser: Debian's headless Chromium, driven by Selenium through
/usr/bin/chromedriver (no Selenium Manager, no network), loads each page with no console error, every plot
has a size, nothing is wider than a laptop screen; a full-page screenshot is kept in the test's folder.

Skipped when Chromium is absent, unless QDISTILL_BROWSER_TESTS=1 (``make test-browser``, which CI runs and
which installs chromium and chromium-driver first): there a missing browser fails the test.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REQUIRED = os.environ.get("QDISTILL_BROWSER_TESTS") == "1"
LAPTOP = (1366, 900)

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not REQUIRED and not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                 reason="needs /usr/bin/chromium and /usr/bin/chromedriver (make test-browser installs them)")]

if REQUIRED:
    from selenium import webdriver
else:
    webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # a new, empty user data folder
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                     f"--window-size={LAPTOP[0]},{LAPTOP[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _open(driver, page: Path) -> list[dict]:
    """Load ``page``; returns the console messages of level SEVERE (errors) it logged."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.set_window_size(*LAPTOP)
    driver.get(page.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _plot_sizes(driver) -> list[tuple[float, float]]:
    return driver.execute_script("return Array.from(document.querySelectorAll('svg.plot'))"
                                 ".map(e => {const r = e.getBoundingClientRect(); return [r.width, r.height];});")


def _screenshot(driver, path: Path) -> tuple[int, int]:
    """A full-page PNG of the loaded page; returns its (width, height) in pixels."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(LAPTOP[0], height + 200)
    assert driver.save_screenshot(str(path))
    width, png_height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG header's IHDR size
    return width, png_height


def _check_page(driver, page: Path, screenshot: Path, min_plots: int) -> None:
    assert _open(driver, page) == []
    sizes = _plot_sizes(driver)
    assert len(sizes) >= min_plots and all(width > 50 and height > 50 for width, height in sizes), sizes
    assert driver.execute_script("return document.documentElement.scrollWidth") <= LAPTOP[0]  # no sideways scrolling
    width, height = _screenshot(driver, screenshot)
    assert width > 0 and height > LAPTOP[1] // 2


def test_a_console_error_is_seen(browser, tmp_path):
    """The check below can fail: a page that logs an error is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><title>bad</title><script>console.error('deliberate')</script>")
    assert any("deliberate" in entry["message"] for entry in _open(browser, page))


def test_report_html_renders_in_chromium(browser, small_demo, tmp_path):
    out, _ = small_demo
    # loss, accuracy, learning rate, two prediction grids, per-class bars, confusion, bits, steps, latency
    _check_page(browser, out / "w8a8_kd" / "report.html", tmp_path / "report.png", min_plots=10)


def test_index_html_renders_in_chromium(browser, small_demo, tmp_path):
    out, _ = small_demo
    _check_page(browser, out / "index.html", tmp_path / "index.png", min_plots=2)  # accuracy vs size, what KD changed
