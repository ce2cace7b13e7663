"""The `nc-ray report` page in a real browser (headless Chromium through Selenium and chromedriver),
offline: every image decodes, the console stays clean, the phase grid renders in its phase
colours, the contents, phase map, heatmaps and tables are there, and nothing is requested but the
file:// page itself and its data: URIs (Chromium's network log). A full-page screenshot is saved
as <tmp>/report.png.

Needs `chromium` and `chromedriver` on PATH (Debian: `apt-get install chromium chromium-driver`,
which .ci/run does); skips, saying so, where they are not found. The sweep is the synthetic one of
tests/test_query.py: no training."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import pytest

from nc_ray.cli import main
from nc_ray.plots import PHASE_COLORS
from tests.test_query import DECAYS, DEPTHS, EXPECTED_PHASES, build_sweep

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402  (after the skip above)

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
# The flags that run Chromium headless as root in a container, and that keep it from calling home
# (updates, sync, field trials), so that every request in the log comes from the page.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000")
SECTIONS = ("members", "configuration", "phases", "forecast", "certificate", "heatmaps", "relations")
N_HEATMAPS = 5
# Every image of the page with its natural and rendered width; every hover title and computed colour of the phase grid.
IMAGES = "return [...document.images].map(i => ({alt: i.alt, natural: i.naturalWidth, shown: i.getBoundingClientRect().width}))"
PHASE_CELLS = ("return [...document.querySelectorAll('table.grid td.phase')].map(td => "
               "({title: td.title, text: td.textContent, color: getComputedStyle(td).backgroundColor}))")


def _chromium() -> tuple[str, str]:
    """Paths of the browser and its driver; skips the module when either is missing."""
    browser = next(filter(None, map(shutil.which, BROWSER_NAMES)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(f"no headless browser: needs one of {', '.join(BROWSER_NAMES)} and chromedriver on PATH "
                    f"(Debian: apt-get install chromium chromium-driver; found browser={browser}, driver={driver})")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # explicit paths: Selenium Manager downloads nothing
    yield driver
    driver.quit()


def _open(browser: webdriver.Chrome, page: Path) -> tuple[list[str], list[dict]]:
    """Load `page`; return the URLs it requested (the page's own first) and its console messages."""
    browser.get("about:blank")  # the start page's own requests and messages are not the page's: drop them
    browser.get_log("performance")
    browser.get_log("browser")
    browser.get(page.as_uri())
    events = (json.loads(entry["message"])["message"] for entry in browser.get_log("performance"))
    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return requested, browser.get_log("browser")


def _foreign(requested: list[str], page: Path) -> list[str]:
    return [url for url in requested if url != page.as_uri() and not url.startswith("data:")]


def _full_page_png(browser: webdriver.Chrome, path: Path) -> Path:
    """A screenshot of the whole page, not only the window (Chrome DevTools Protocol)."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
    })
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    sweep = build_sweep(root / "alpha")
    assert main(["report", str(sweep), "--radius", "2.0", "--output", str(root / "report.html")]) == 0
    return root / "report.html"


def test_the_report_renders_offline_in_chromium(browser, report, tmp_path):
    requested, console = _open(browser, report)
    assert requested[0] == report.as_uri()
    assert _foreign(requested, report) == []
    assert console == []

    images = browser.execute_script(IMAGES)
    assert len(images) == 1 + N_HEATMAPS + 7 and all(i["natural"] > 0 and i["shown"] > 0 for i in images), images
    assert len(requested) == 1 + len(images)  # the page and one data: URI per image: nothing else
    in_section = lambda section, selector: browser.execute_script(  # noqa: E731
        f"return document.querySelectorAll('section#{section} {selector}').length")
    assert in_section("phases", "img[alt^=phase_map]") == 1
    assert in_section("heatmaps", "img[alt^=heatmap_]") == N_HEATMAPS

    anchors = browser.execute_script("return [...document.querySelectorAll('nav a')].map(a => a.hash.slice(1))")
    assert anchors == list(SECTIONS)
    assert browser.execute_script("return arguments[0].every(id => document.getElementById(id) !== null)", anchors)
    for section, n_tables in {"members": 1, "configuration": 1, "phases": 2, "forecast": 3, "certificate": 1}.items():
        rows = browser.execute_script(f"return [...document.querySelectorAll('section#{section} table')].map(t => t.rows.length)")
        assert len(rows) == n_tables and min(rows) >= 2, (section, rows)  # a heading row and data

    cells = browser.execute_script(PHASE_CELLS)
    assert len(cells) == len(DEPTHS) * len(DECAYS)
    depths_down = sorted(DEPTHS, reverse=True)  # the grid's rows: deepest first, λ ascending along a row
    for (depth, decay), cell in zip([(d, w) for d in depths_down for w in DECAYS], cells):
        assert cell["title"].startswith(f"λ = {decay:.4g}, depth {depth}: {EXPECTED_PHASES[decay, depth]}")
        red, green, blue = (round(255 * c) for c in matplotlib.colors.to_rgb(PHASE_COLORS[EXPECTED_PHASES[decay, depth]]))
        assert cell["color"] == f"rgb({red}, {green}, {blue})"

    screenshot = _full_page_png(browser, tmp_path / "report.png")
    height, width, _ = matplotlib.image.imread(screenshot).shape
    assert width >= 1000 and height > 3 * 1000  # the whole page, several windows tall
    print(f"screenshot: {screenshot}")


def test_the_checks_see_a_page_that_loads_from_elsewhere(browser, tmp_path):
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>leaky</title>'
                    '<link rel="stylesheet" href="https://example.invalid/style.css"></head>'
                    '<body><img alt="remote" src="http://127.0.0.1:9/remote.png"><img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    requested, console = _open(browser, page)
    assert sorted(_foreign(requested, page)) == ["http://127.0.0.1:9/remote.png", "https://example.invalid/style.css"]
    assert len(console) == 2 and all(m["level"] == "SEVERE" for m in console)
    assert [i["natural"] for i in browser.execute_script(IMAGES)] == [0, 0]
