"""The one-page UI at `/` of `edgediff serve` (serve/static/index.html), driven in a real headless browser:
Debian's Chromium through its chromedriver, against a real `edgediff serve` process with the built-in
model. `./dev` installs both; the test fails (never skips) without them, so CI cannot pass by not
running it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image
from serve_process import ServeProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIZE = 128
# Enough steps that the page's progress polls (every 300 ms) land mid-run even on an idle machine:
# about 2 s for the built-in model at 128x128 on one CPU core.
STEPS = 40


@pytest.fixture(scope="module")
def server(builtin_model, tmp_path_factory):
    # not waited for here: Chromium starts meanwhile (`page` waits for both)
    started = ServeProcess(tmp_path_factory.mktemp("serve-ui"), "--model", str(builtin_model))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        # A failure, not a skip: the install is part of the test set-up (./dev), and a skipped UI test
        # would let CI pass without ever opening the page.
        pytest.fail(f"{' and '.join(missing)} not found: the UI test needs Debian's chromium and "
                    "chromium-driver; run ./dev (it installs them) or `apt-get install chromium chromium-driver`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                # Without these Chromium keeps reaching out (updates, sync, QUIC probes) and floods a
                # closed network with refused connections.
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                "--window-size=1100,800"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        # The Service path already keeps Selenium Manager from looking for a driver; offline mode makes
        # sure it never tries to download one should that change.
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=subprocess.DEVNULL), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(server, browser):
    """The UI, freshly loaded, with its sampler list filled from the server."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.wait())
    WebDriverWait(browser, 20).until(
        lambda d: len(d.find_elements("css selector", "#sampler option")) > 1
        or d.find_element("id", "error").is_displayed())
    assert not browser.find_element("id", "error").is_displayed(), browser.find_element("id", "error").text
    return browser


def fill(driver, **fields):
    for name, value in fields.items():
        field = driver.find_element("id", name)
        field.clear()
        field.send_keys(str(value))


def wait_until_idle(driver, timeout):
    """Waits for the page to leave its running state (Generate enabled again)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.find_element("id", "generate").is_enabled())


# Records, in the page itself, every value the progress bar takes and every live preview: values between
# two polls of the test would otherwise go unseen.
WATCH = """
window.seen = {progress: [], previews: 0};
new MutationObserver(() => window.seen.progress.push(document.getElementById('progress').value))
  .observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['value']});
new MutationObserver(() => window.seen.previews++)
  .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});
"""


def test_generate_shows_progress_then_the_picture_and_its_download(page):
    fill(page, prompt="a red circle on a blue background", negative="green", steps=STEPS, width=SIZE,
         height=SIZE, seed=1234)
    page.execute_script(WATCH)
    started = time.monotonic()
    page.find_element("id", "generate").click()
    assert not page.find_element("id", "generate").is_enabled()  # running: Generate waits
    assert page.find_element("id", "interrupt").is_enabled()
    wait_until_idle(page, 90)
    elapsed = time.monotonic() - started
    error = page.find_element("id", "error")
    assert not error.is_displayed(), error.text

    seen = page.execute_script("return window.seen")
    # Above A1111's 0.01 that marks a job as started: at least one sampling step was counted.
    during = [v for v in seen["progress"] if 0.01 < v < 1]
    assert during or seen["previews"], f"no progress shown during a {elapsed:.1f} s generation: {seen}"
    assert page.find_element("id", "progress").get_property("value") == 1

    result = page.find_element("id", "result")
    assert result.is_displayed()
    natural = page.execute_script("const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight]",
                                  result)
    assert natural == [True, SIZE, SIZE]

    link = page.find_element("id", "download")
    assert link.is_displayed()
    assert link.get_attribute("download") == "edgediff-1234.png"
    href = link.get_attribute("href")
    prefix = "data:image/png;base64,"
    assert href.startswith(prefix), href[:60]
    data = base64.b64decode(href[len(prefix):])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.size == (SIZE, SIZE)
    assert "a red circle on a blue background" in image.text.get("parameters", "")
    assert "1234" in page.find_element("id", "status").text

    if shot := os.environ.get("EDGEDIFF_UI_SCREENSHOT"):  # for a person checking the layout by eye
        page.save_screenshot(shot)


def server_refusal(server, body) -> list[str]:
    """The messages of the server's own 4xx answer to `body`, as a client that is not the page gets them."""
    request = urllib.request.Request(server.url + "sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert 400 <= refused.value.code < 500, refused.value.code
    answer = json.loads(refused.value.read())
    detail = answer.get("detail") or answer.get("errors") or answer.get("error")
    messages = [d["msg"] for d in detail] if isinstance(detail, list) else [str(detail)]
    assert all(messages), answer
    return messages


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", 10_000), ("width", -64)])
def test_a_refused_value_shows_the_servers_message(page, server, field, value):
    fields = {"prompt": "a star", "steps": 5, "width": SIZE, "height": SIZE, "seed": 1, field: value}
    fill(page, **fields)
    expected = server_refusal(server, {"prompt": "a star", "negative_prompt": "", "cfg_scale": 7,
                                       "batch_size": 1, "n_iter": 1, **fields})
    page.find_element("id", "generate").click()
    wait_until_idle(page, 30)
    error = page.find_element("id", "error")
    assert error.is_displayed()
    for message in expected:
        assert message in error.text, (message, error.text)
    assert not page.find_element("id", "result").is_displayed()
    assert not page.find_element("id", "download").is_displayed()


def test_interrupt_ends_the_generation(page):
    from selenium.webdriver.support.ui import WebDriverWait

    # The server's most steps: the run is still going when the click lands, even on a fast machine.
    fill(page, prompt="a blue square", steps=150, width=SIZE, height=SIZE, seed=7)
    page.find_element("id", "generate").click()
    # Interrupt once the progress bar shows the run under way.
    WebDriverWait(page, 30, poll_frequency=0.05).until(
        lambda d: 0 < d.find_element("id", "progress").get_property("value") < 1)
    page.find_element("id", "interrupt").click()
    wait_until_idle(page, 30)
    error = page.find_element("id", "error")
    assert not error.is_displayed(), error.text
    assert page.find_element("id", "status").text.startswith("Interrupted")


def test_empty_fields_take_the_models_defaults(page):
    # Width and height left empty: the model's native size (64 for the built-in model); seed -1: a
    # random seed, which the download's file name gives.
    fill(page, prompt="a yellow diamond", steps=5, width="", height="", seed=-1)
    page.find_element("id", "generate").click()
    wait_until_idle(page, 60)
    error = page.find_element("id", "error")
    assert not error.is_displayed(), error.text
    result = page.find_element("id", "result")
    assert page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", result) == [64, 64]
    name = page.find_element("id", "download").get_attribute("download")
    assert re.fullmatch(r"edgediff-\d+\.png", name) and name != "edgediff--1.png", name
