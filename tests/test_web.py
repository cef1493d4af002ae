"""The chat page at /, in a real browser: Debian's headless Chromium driven by Selenium, against a live
server over a scripted model. It streams an answer rendered as markdown with the reasoning folded above
it, stops a long answer with the button (the request is cancelled on the server), and tells a 401 apart.
Skipped, with the reason, where Chromium, its driver or selenium is missing (.ci/run installs them)."""

import shutil
import time

import httpx
import pytest
from server_live import served as serving
from stubs import ScriptedModel, by_prompt, replies

from qwen3_mlx.generation.engine import Engine

REASONING = "The user greets me. I should answer kindly."
ANSWER = "Hello! Here is **bold** text and `code`."
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def endless(tok, seconds_per_token=0.02):
    """A script that never ends its answer, slowly: a stream long enough to stop by hand."""
    closed = tok.encode("</think>\n\n")
    word = tok.encode(" more")[0]

    def script(prompt, response):
        time.sleep(seconds_per_token)
        if prompt[-len(closed):] != closed and not response:
            return tok.think_start_id
        if tok.think_end_id not in response and prompt[-len(closed):] != closed:
            return tok.think_end_id if len(response) > 3 else word
        return word

    return script


@pytest.fixture(scope="module")
def served(tiny):
    tok = tiny[1]
    model = ScriptedModel(by_prompt(tok, {"forever": endless(tok)}, replies(tok, REASONING, ANSWER)),
                               tok.encode("<|im_start|>assistant\n"))
    with Engine(model, tok, max_batch=2) as engine, \
            serving(engine, "stub", max_tokens=4000) as server:
        yield engine, server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no Chromium or chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def open_page(browser, url):
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    wait_for(lambda: browser.find_element("id", "model").text)


def ask(browser, text):
    box = browser.find_element("id", "prompt")
    box.send_keys(text)
    browser.find_element("id", "send").click()


def test_the_page_streams_an_answer_as_markdown_with_the_reasoning_folded(browser, served, tmp_path):
    _, server = served
    open_page(browser, server.url)
    assert browser.find_element("id", "model").text == "stub"
    ask(browser, "Hello there")
    wait_for(lambda: browser.find_elements("css selector", ".assistant .answer strong"))
    wait_for(lambda: not browser.find_element("id", "stop").is_enabled())
    assert browser.find_element("css selector", ".assistant .answer strong").text == "bold"
    turn = browser.find_element("css selector", ".assistant")
    assert turn.find_element("css selector", ".answer").text == "Hello! Here is bold text and code."
    details = turn.find_element("css selector", "details.reasoning")
    summary = details.find_element("tag name", "summary").text
    assert details.get_attribute("open") is None and summary.startswith("Reasoning (") and "tokens" in summary
    assert "~" not in summary  # the exact count, from the usage
    details.find_element("tag name", "summary").click()
    assert details.find_element("css selector", ".text").text == REASONING
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 0


def test_the_stop_button_cancels_the_request_on_the_server(browser, served, tmp_path):
    engine, server = served
    open_page(browser, server.url)
    ask(browser, "Talk forever")
    wait_for(lambda: "more" in browser.find_element("css selector", ".assistant .answer").text)
    assert engine.rows == 1
    browser.find_element("id", "stop").click()
    wait_for(lambda: engine.rows == 0, seconds=5)
    assert browser.find_element("css selector", ".assistant .note").text == "Stopped."
    assert browser.find_element("id", "send").is_enabled()
    browser.save_screenshot(str(tmp_path / "stopped.png"))


def test_a_401_asks_for_the_key_and_the_key_then_works(browser, served):
    engine, _ = served
    with serving(engine, "stub", api_key="s3cret") as server:
        browser.get(server.url + "/")
        browser.execute_script("localStorage.clear()")
        browser.get(server.url + "/")
        ask(browser, "Hello there")
        error = wait_for(lambda: browser.find_elements("css selector", ".assistant .error"))
        assert "needs an API key (401)" in error[0].text
        key = browser.find_element("id", "key")
        assert key.is_displayed()
        key.send_keys("s3cret")
        ask(browser, "Hello there")
        wait_for(lambda: browser.find_elements("css selector", ".assistant .answer strong"))


def test_the_page_is_served_with_its_vendored_libraries_and_no_ui_turns_it_off(served, tiny):
    engine, server = served
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/ui/app.js" in page.text
    for path in ("/ui/vendor/marked.umd.js", "/ui/vendor/purify.min.js", "/ui/style.css"):
        assert httpx.get(server.url + path).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    with serving(engine, "stub", ui=False) as bare:
        assert httpx.get(bare.url + "/").status_code == 404
        assert httpx.get(bare.url + "/ui/app.js").status_code == 404
