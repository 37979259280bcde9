"""The chat page (llama/static/chat.html) in real headless Chromium, against a real server on stories260K.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and selenium (the
server-test extra); .ci/run installs them. Without them these tests fail, saying what to install, unless
LLAMA_SKIP_BROWSER=1, which skips them. A screenshot goes to tests/artifacts/chat_page.png (ignored by git);
LLAMA_UPDATE_SCREENSHOT=1 also copies it to docs/chat_page.png, the one README shows.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = REPO / "tests" / "artifacts"
MAX_SEQ_LEN = 1024
MODEL = "stories260K"


def _missing() -> list:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    for module in ("selenium", "httpx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module}")
    return missing


@pytest.fixture(scope="module")
def browser_ok():
    if os.environ.get("LLAMA_SKIP_BROWSER") == "1":
        pytest.skip("LLAMA_SKIP_BROWSER=1")
    missing = _missing()
    if missing:
        pytest.fail(f"the chat page tests need a browser; missing: {', '.join(missing)}. Install them with "
                    "`apt-get install -y chromium chromium-driver` and `pip install -e '.[server-test]'` "
                    "(CI's .ci/run does), or set LLAMA_SKIP_BROWSER=1 to skip these tests", pytrace=False)


def start_server(ckpt_dir: Path, *flags: str):
    """python -m llama.server on a free port; returns its base URL and a function that stops it."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile(mode="w+")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LLAMA_API_KEY")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt_dir), "--tokenizer_path",
         str(ckpt_dir / "tokenizer.model"), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
         "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "2", "--log_level", "warning", *flags],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    def fail(why: str):
        log.seek(0)
        output = log.read()[-4000:]
        stop()
        pytest.fail(f"{why}:\n{output}")

    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            fail(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, stop
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            fail("the server did not answer /health within 60 s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(stories260k, browser_ok):
    url, stop = start_server(stories260k)
    yield url
    stop()


@pytest.fixture(scope="module")
def driver(browser_ok):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="llama-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,760"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    browser.set_script_timeout(30)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


# Helpers ----------------------------------------------------------------------------------------------------


def wait_for(condition, timeout: float = 20.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def text(driver, element) -> str:
    """textContent: exactly the characters streamed in (Selenium's .text trims and folds whitespace)."""
    return driver.execute_script("return arguments[0].textContent", element)


def replies(driver, done: bool = False) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, '#messages .assistant' + ('[data-done="true"]' if done else ''))


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(lambda: text(driver, by_id(driver, "model")) == MODEL, what="the model name from /v1/models")


def fill(driver, name: str, value) -> None:
    element = by_id(driver, name)
    element.clear()
    element.send_keys(str(value))


def send(driver, message: str) -> None:
    fill(driver, "message", message)
    by_id(driver, "send").click()


def api_reply(url: str, messages: list, **settings) -> str:
    import httpx

    body = {"model": MODEL, "messages": messages, **settings}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def metric(url: str, pattern: str) -> float:
    import httpx

    found = re.search(rf"^{pattern} (\S+)$", httpx.get(url + "/metrics", timeout=5).text, re.M)
    return float(found.group(1)) if found else 0.0


def screenshot(driver) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "chat_page.png"))
    if os.environ.get("LLAMA_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "chat_page.png", REPO / "docs" / "chat_page.png")


# Tests ------------------------------------------------------------------------------------------------------


def test_streamed_replies_equal_the_api_and_the_conversation_is_kept(server, driver):
    open_page(driver, server)
    system = "You are a storyteller."
    fill(driver, "system", system)
    fill(driver, "temperature", 0)
    fill(driver, "max-tokens", 40)
    send(driver, "Once upon a time")
    wait_for(lambda: len(replies(driver, done=True)) == 1, what="the first reply to finish")
    first = text(driver, replies(driver)[0])
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Once upon a time"}]
    assert first and first == api_reply(server, messages, temperature=0, max_tokens=40)

    # The second turn sends the whole conversation; Enter sends too.
    from selenium.webdriver.common.keys import Keys

    fill(driver, "message", "What happened next?")
    by_id(driver, "message").send_keys(Keys.ENTER)
    wait_for(lambda: len(replies(driver, done=True)) == 2, what="the second reply to finish")
    second = text(driver, replies(driver)[1])
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "What happened next?"}]
    assert second and second == api_reply(server, messages, temperature=0, max_tokens=40)
    assert text(driver, by_id(driver, "error")) == ""
    assert by_id(driver, "message").get_attribute("value") == ""
    screenshot(driver)


def test_stop_keeps_the_partial_reply_and_frees_the_slot(server, driver):
    open_page(driver, server)
    fill(driver, "temperature", 0)
    fill(driver, "max-tokens", 1000)  # stories260K goes on for 1000 tokens without EOS at temperature 0: ~3 s
    aborted = metric(server, r'llama_requests_finished_total\{reason="abort"\}')
    send(driver, "Once upon a time")
    wait_for(lambda: replies(driver) and len(text(driver, replies(driver)[0])) >= 20, what="the reply to start streaming")
    assert metric(server, "llama_requests_running") == 1.0
    by_id(driver, "stop").click()
    wait_for(lambda: replies(driver, done=True), timeout=5, what="the stopped reply to be marked done")
    reply = replies(driver)[0]
    partial = text(driver, reply)
    assert reply.get_attribute("data-stopped") == "true"
    assert by_id(driver, "stop").get_attribute("disabled") and by_id(driver, "send").is_enabled()
    # The server noticed the closed stream, aborted the request and freed its slot.
    wait_for(lambda: metric(server, "llama_requests_running") == 0.0, timeout=5, what="llama_requests_running 0.0")
    assert metric(server, r'llama_requests_finished_total\{reason="abort"\}') == aborted + 1
    time.sleep(0.3)
    assert text(driver, reply) == partial  # nothing more arrives
    full = api_reply(server, [{"role": "user", "content": "Once upon a time"}], temperature=0, max_tokens=1000)
    assert len(partial) < len(full) and full.startswith(partial)


def test_new_chat_clears_the_conversation(server, driver):
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    fill(driver, "temperature", 0)
    fill(driver, "max-tokens", 8)
    send(driver, "Tell me a story")
    wait_for(lambda: replies(driver, done=True), what="the reply to finish")
    by_id(driver, "new-chat").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    send(driver, "Once upon a time")  # sent alone: the first turn is forgotten
    wait_for(lambda: replies(driver, done=True), what="the reply to finish")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2
    only = [{"role": "user", "content": "Once upon a time"}]
    assert text(driver, replies(driver)[0]) == api_reply(server, only, temperature=0, max_tokens=8)


def test_an_error_is_shown_and_the_message_given_back(server, driver):
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    fill(driver, "max-tokens", 5000)  # more than the context
    send(driver, "Once upon a time")
    error = wait_for(lambda: text(driver, by_id(driver, "error")), what="the error message")
    assert error.startswith("400: ") and "max_tokens" in error and "{" not in error
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    assert by_id(driver, "message").get_attribute("value") == "Once upon a time"
    assert by_id(driver, "send").is_enabled()


def test_the_api_key_is_sent_and_remembered(stories260k, browser_ok, driver):
    url, stop = start_server(stories260k, "--api_key", "sesame")
    try:
        driver.get(url + "/")
        error = wait_for(lambda: text(driver, by_id(driver, "error")), what="the 401 error")
        assert error.startswith("Could not list the models: 401: missing or wrong API key")
        fill(driver, "api-key", "sesame")
        by_id(driver, "system").click()  # leaving the field saves the key and lists the models again
        wait_for(lambda: text(driver, by_id(driver, "model")) == MODEL, what="the model name with the key")
        assert text(driver, by_id(driver, "error")) == ""
        open_page(driver, url)  # a reload: the key comes back from localStorage
        assert by_id(driver, "api-key").get_attribute("value") == "sesame"
        fill(driver, "max-tokens", 4)
        send(driver, "Hello")
        wait_for(lambda: replies(driver, done=True), what="the reply to finish")
        assert text(driver, replies(driver)[0]) and text(driver, by_id(driver, "error")) == ""
    finally:
        stop()
