"""The chat page at ``/`` in a real headless browser (Debian's chromium and chromedriver, driven
by selenium): type a question, watch the answer stream in, compare it with the API's answer,
reset. Skipped, with the reason, when chromium or selenium is absent (``make install`` installs
chromium when it can)."""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("starlette", reason="llmkit serve needs the serve extra (starlette)")
pytest.importorskip("uvicorn", reason="llmkit serve needs the serve extra (uvicorn)")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (dev extra)"
)

from serve_helpers import post, running_server, tiny_chat_model  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    model = tiny_chat_model(tiny_tokenizer, tmp_path_factory.mktemp("page-model"))
    with running_server(model, tmp_path_factory.mktemp("page-log")) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_streams_an_answer_and_resets(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    max_tokens = 400  # long enough to watch it grow
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.01)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert "context 1024" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "system").send_keys("Be brief.")
    mt = browser.find_element(By.ID, "max_tokens")
    mt.clear()
    mt.send_keys(str(max_tokens))
    browser.find_element(By.ID, "input").send_keys("Good morrow")
    browser.find_element(By.ID, "send").click()

    # the answer grows while it streams: several distinct lengths seen before it is done
    lengths = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        msgs = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if msgs:
            text = msgs[-1].find_element(By.CLASS_NAME, "text").get_attribute("textContent")
            if not lengths or lengths[-1] != len(text):
                lengths.append(len(text))
            if msgs[-1].get_attribute("data-state") == "done":
                break
        time.sleep(0.005)
    msg = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert msg.get_attribute("data-state") == "done"
    assert msg.get_attribute("data-finish") == "length"
    shown = msg.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
    assert len([n for n in lengths if 0 < n < len(shown)]) >= 2, lengths  # seen mid-stream

    # the page shows what the API answers for the same conversation
    status, body, _ = post(
        server.url + "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Good morrow"},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    assert status == 200
    assert shown == body["choices"][0]["message"]["content"]
    users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.find_element(By.CLASS_NAME, "text").text for u in users] == ["Good morrow"]

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert browser.execute_script("return conversation.length") == 0  # the conversation is gone
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Be brief."
