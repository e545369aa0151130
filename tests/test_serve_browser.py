"""The upload page in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by selenium opens ``GET /``, uploads an image, and must show the same top-5 labels and
scores as ``POST /predict`` gives for that file, the attention overlay, and a one-column layout
without sideways scrolling at a phone's width (390 px).

Screenshots go to the test's temporary folder; with ``TORCHCVT_SCREENSHOT_DIR`` set they go there
instead (docs/ has the committed ones: ``TORCHCVT_SCREENSHOT_DIR=docs``, with
``TORCHCVT_SCREENSHOT_WEIGHTS`` and ``TORCHCVT_SCREENSHOT_IMAGE`` for a trained model and a real image).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="cvt serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import Server, image_bytes  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
WAIT = 300  # seconds: a safety net for a loaded machine


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1100,820"):
        options.add_argument(flag)
    # Debian's chromedriver, named explicitly: selenium must not try to download one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_upload_page_shows_the_labels_and_the_attention(browser, reference, tmp_path):
    weights = os.environ.get("TORCHCVT_SCREENSHOT_WEIGHTS") or reference("tiny")[1]
    image = Path(os.environ.get("TORCHCVT_SCREENSHOT_IMAGE") or tmp_path / "upload.png")
    if not image.exists():
        image.write_bytes(image_bytes(7, (160, 120)))
    shots = Path(os.environ.get("TORCHCVT_SCREENSHOT_DIR") or tmp_path)
    server = Server(weights, name="digits" if "TORCHCVT_SCREENSHOT_WEIGHTS" in os.environ else "tiny",
                    log=tmp_path / "server.log")
    try:
        expected = httpx.post(f"{server.url}/predict?top_k=5", files={"file": (image.name, image.read_bytes())},
                              timeout=WAIT).json()[0]["top_k"]
        browser.get(server.url + "/")
        assert "Classify an image" in browser.find_element(By.TAG_NAME, "h1").text
        attention = browser.execute_script("return CONFIG.attention")  # true for the tiny model: 7x7 keys
        if attention:
            browser.find_element(By.ID, "show-attention").click()
        browser.find_element(By.ID, "file").send_keys(str(image.resolve()))
        wait = WebDriverWait(browser, WAIT)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .row")) == len(expected))
        rows = [row.text.split("\n") for row in browser.find_elements(By.CSS_SELECTOR, "#results .row .text")]
        assert rows == [[e["label"], f"{100 * e['score']:.1f} %"] for e in expected]
        assert browser.find_element(By.ID, "status").text == ""
        if attention or "TORCHCVT_SCREENSHOT_WEIGHTS" not in os.environ:
            wait.until(lambda d: d.execute_script("const a = document.getElementById('attention');"
                                                  "return a.offsetWidth > 0 && a.complete && a.naturalWidth > 0"))
        assert browser.execute_script("return document.getElementById('preview').naturalWidth") > 0
        browser.save_screenshot(str(shots / "serving-page.png"))

        # A phone: 390 px wide, touch, 2x pixels. One column, nothing wider than the screen.
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        wait.until(lambda d: d.execute_script("return window.innerWidth") == 390)
        layout = browser.execute_script("""
            const [upload, result] = document.querySelectorAll('.card');
            return {overflow: document.documentElement.scrollWidth - window.innerWidth,
                    stacked: result.getBoundingClientRect().top >= upload.getBoundingClientRect().bottom,
                    height: document.documentElement.scrollHeight};""")
        assert layout["overflow"] <= 0 and layout["stacked"], layout
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 390, "height": layout["height"], "deviceScaleFactor": 2, "mobile": True})
        browser.save_screenshot(str(shots / "serving-page-phone.png"))
    finally:
        assert server.stop() == 0, server.log()
