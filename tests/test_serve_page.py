"""The web chat page in a real headless Chromium against a real server: enter the API key, send a
message, watch the streamed answer and its tokens/s appear, keep the conversation, reset it."""

from pathlib import Path

import pytest
from browser import CHROMIUM, DRIVER, MISSING, headless_chromium
from serve_helpers import running_server

KEY = "page-key"

pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason=MISSING)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("page") / "server.log"
    with running_server(tiny_models["llama"], log, "--api-key", KEY) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    driver = headless_chromium(tmp_path, window="1000,760")
    try:
        yield driver
    finally:
        driver.quit()


def _send(browser, wait, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "send").text == "Send")


def test_chat_page_streams_an_answer_with_tokens_per_second(server, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)  # 401 shown

    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    temperature = browser.find_element(By.ID, "temperature")  # leaving the key fires `change`
    temperature.clear()
    temperature.send_keys("0")  # greedy: the tiny model's first answer is known to have text
    browser.find_element(By.ID, "max-tokens").send_keys("24")  # two turns fit in the context
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("llama"))
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()

    _send(browser, wait, "How much is the kettle?")
    answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .bubble")
    assert len(answers) == 1 and answers[0].text.strip()
    stats = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    assert "tokens/s" in stats, stats
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    browser.save_screenshot(str(tmp_path / "chat_page.png"))

    _send(browser, wait, "Do you ship it to Oslo?")
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user .bubble")] == [
        "How much is the kettle?",
        "Do you ship it to Oslo?",
    ]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2, [
        (e.get_attribute("class"), e.text) for e in browser.find_elements(By.CSS_SELECTOR, ".msg")
    ]
    assert (
        browser.execute_script("return JSON.parse(localStorage['chatdistill.history']).length") == 4
    )

    browser.refresh()  # the conversation survives a reload
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2)
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.find_element(By.ID, "empty").is_displayed()


def test_chat_page_shows_server_errors(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    _send(browser, wait, "hello")  # no API key entered: the server answers 401
    error = browser.find_element(By.CSS_SELECTOR, ".msg.error .bubble").text
    assert "API key" in error
