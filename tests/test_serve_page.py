"""The page at / in a real browser: headless Chromium (selenium) against a real `jaxllm serve` subprocess.

A checkpoint with a chat template gets the chat page (messages streamed from /v1/chat/completions),
one without gets the completion page; both servers require an API key, typed into the page. The
browser tests skip with a reason where Chromium, chromedriver or selenium are missing (`make
browser-deps` installs Chromium on Debian; selenium is in the dev extras). The page's mode is
checked through Flask's test client too, which needs no browser.
"""

import json
import shutil

import pytest

from jaxllm.serve import Engine, EngineSettings, create_app
from jaxllm.text import TextCodec

from serve_helpers import SLOTS
from test_serve_server import API_KEY, call, running_server

TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
EOS = "<|endoftext|>"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,800"]  # fmt: skip
WAIT_S = 120


# The page's mode, without a browser ---------------------------------------------------------------


def test_the_page_is_a_completion_page_without_a_chat_template(serve_engine):
    page = create_app(serve_engine).test_client().get("/").get_data(as_text=True)
    assert 'data-mode="completion"' in page and "{{" not in page


def test_the_page_is_a_chat_page_with_a_chat_template(checkpoint, serve_tokenizer):
    _, _, cfg, params = checkpoint
    codec = TextCodec.wrap(serve_tokenizer)
    codec = TextCodec(codec.tokenizer, end_ids=codec.end_ids, chat_template=TEMPLATE)
    app = create_app(Engine(cfg, params, codec, EngineSettings(slots=SLOTS)))  # never started: / needs no model
    page = app.test_client().get("/").get_data(as_text=True)
    assert 'data-mode="chat"' in page and "/v1/chat/completions" in page and "{{" not in page
    assert ".innerHTML" not in page and "insertAdjacentHTML" not in page  # model text: textContent only


# A real browser -----------------------------------------------------------------------------------


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver); skips the test with the reason when either, or selenium, is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium or chromedriver is not installed (on Debian: make browser-deps)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser_path, driver_path = chromium_paths()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint, tmp_path_factory):
    """conftest.py's checkpoint, with a tokenizer_config.json naming a chat template and the EOS token."""
    ck = tmp_path_factory.mktemp("chat-ckpt") / "chat"
    shutil.copytree(checkpoint[0], ck)
    (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": EOS}))
    return ck


def serve_flags():
    return ["--slots", "2", "--max-prefill-batch", "1", "--timeout", "60"]


@pytest.fixture(scope="module")
def chat_server(browser, chat_checkpoint, tmp_path_factory):
    with running_server(chat_checkpoint, tmp_path_factory.mktemp("serve-chat"), *serve_flags()) as (_, port):
        yield port


@pytest.fixture(scope="module")
def completion_server(browser, checkpoint, tmp_path_factory):
    with running_server(checkpoint[0], tmp_path_factory.mktemp("serve-plain"), *serve_flags()) as (_, port):
        yield port


def fill(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def wait_for(driver, script: str, what: str):
    """The value of the JavaScript expression `script` once it is truthy (fails after WAIT_S, naming `what`)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script};"), message=f"waiting for {what}"
    )


def click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def open_page(driver, port: int, mode: str) -> None:
    driver.get(f"http://127.0.0.1:{port}/")
    assert driver.execute_script("return document.body.dataset.mode") == mode
    assert driver.execute_script(f"return document.getElementById('{mode}').hidden") is False


STREAM_DONE = "!document.getElementById('{button}').disabled && document.getElementById('stop{suffix}').disabled"


def test_chat_page_streams_an_answer_shows_api_errors_and_starts_a_new_chat(browser, chat_server):
    port = chat_server
    open_page(browser, port, "chat")
    fill(browser, "temperature", "0")
    fill(browser, "max_tokens", "10")
    # a wrong key: the API's error is shown, and the message goes back into the box
    fill(browser, "key", "wrong-key")
    fill(browser, "message", "the cat")
    click(browser, "send")
    error = wait_for(browser, "document.getElementById('error').textContent", "the API's error")
    assert "Incorrect or missing API key" in error
    assert browser.execute_script("return document.querySelectorAll('#messages .msg').length") == 0
    assert browser.execute_script("return document.getElementById('message').value") == "the cat"

    fill(browser, "key", API_KEY)
    assert browser.execute_script("return sessionStorage.getItem('jaxllm-api-key')") == API_KEY
    click(browser, "send")
    wait_for(browser, STREAM_DONE.format(button="send", suffix=""), "the stream to finish")
    answer = browser.execute_script("return document.querySelector('#messages .msg.assistant').textContent")
    assert answer, "no text was streamed into the answer bubble"
    assert browser.execute_script("return document.getElementById('error').textContent") == ""
    assert browser.execute_script("return document.querySelector('#messages .msg.user').textContent") == "the cat"
    assert "tokens in" in browser.execute_script("return document.getElementById('status').textContent")
    # the streamed answer is the model's: the same request, not streamed, gives the same text
    body = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 10, "temperature": 0}
    status, _, data = call(port, "POST", "/v1/chat/completions", body)
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == answer

    # the key survives a reload (sessionStorage); New chat empties the conversation
    browser.refresh()
    assert browser.execute_script("return document.getElementById('key').value") == API_KEY
    fill(browser, "message", "a dog")
    click(browser, "send")
    wait_for(browser, STREAM_DONE.format(button="send", suffix=""), "the second stream to finish")
    assert browser.execute_script("return document.querySelectorAll('#messages .msg').length") == 2
    click(browser, "reset")
    assert browser.execute_script("return document.querySelectorAll('#messages .msg').length") == 0


def test_completion_page_streams_text_without_a_chat_template(browser, completion_server):
    open_page(browser, completion_server, "completion")
    fill(browser, "key", API_KEY)
    fill(browser, "prompt", "the cat")
    fill(browser, "max_tokens", "12")
    click(browser, "go")
    wait_for(browser, STREAM_DONE.format(button="go", suffix="_completion"), "the stream to finish")
    assert browser.execute_script("return document.querySelector('#out .gen').textContent")
    assert browser.execute_script("return document.getElementById('out').textContent").startswith("the cat")
    assert browser.execute_script("return document.getElementById('error').textContent") == ""

