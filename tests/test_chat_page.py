"""The chat page at GET /, in a real browser: headless Chromium from Debian's packages driven by
Selenium through Debian's chromium-driver. A message typed into the page gets the model's reply
streamed into it (the same text the API gives for the same settings), and a request the server
refuses shows the server's message. Without a browser the test skips, except under CI=true."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_serve import LiveServer

from scratchlm.serve import build_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        reason = ("no headless browser: install Debian's chromium and chromium-driver "
                  "(apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(reason + "; .ci/run installs them")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat_server(chat_model: Path):
    server = LiveServer(build_app(chat_model, model_name="tiny-chat"))
    yield server
    server.close()


def settle(driver, timeout: float = 60):
    """The newest reply once the page has finished it (streamed to the end, or refused)."""
    from selenium.webdriver.support.ui import WebDriverWait

    # One script reads the newest bubble and its state: the page's own thread runs it whole, so
    # the streaming bubble cannot be removed (a refusal replaces it) between finding and reading.
    newest_finished = """
        const all = document.querySelectorAll(".msg.assistant, .msg.error");
        const last = all[all.length - 1];
        if (!last) return null;
        const over = last.classList.contains("error") || last.dataset.state === "done";
        return over ? last : null;"""
    return WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script(newest_finished) or False)


def type_message(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def set_field(driver, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.ID, field)
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('change'));", el, value)


@pytest.mark.slow
def test_chat_page_streams_the_reply_and_shows_refusals(browser, chat_server: LiveServer
                                                         ) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(chat_server.url + "/")
    WebDriverWait(browser, 30).until(
        lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)
    assert "Chat template: chat" in browser.find_element(By.ID, "mode").text
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "24")
    type_message(browser, "Who comes there?")
    reply = settle(browser)
    expected = chat_server.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Who comes there?"}],
        max_tokens=24, temperature=0).choices[0].message.content
    assert reply.text == expected.strip()  # the browser trims the bubble's edges
    assert int(reply.get_attribute("data-chunks")) > 1  # it came in pieces, as streamed
    assert reply.get_attribute("data-finish") in ("stop", "length")
    # a second message asks for more tokens than the context holds: the server refuses
    set_field(browser, "max-tokens", "5000")
    type_message(browser, "And then?")
    error = settle(browser)
    assert "error" in error.get_attribute("class")
    assert "The server refused (400)" in error.text and "maximum context length" in error.text
    users = [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user")]
    assert users == ["Who comes there?", "And then?"]
