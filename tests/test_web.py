"""The chat page at /, in a real browser: Debian's headless Chromium driven by Selenium, against a live
server over a scripted model. It streams an answer rendered as markdown with the reasoning folded above
it, follows the newest answer as it streams, stops a long answer with the button (the request is
cancelled on the server), notes a cut answer, fetches nothing the model writes (images are links),
draws tables with borders, and tells a missing key from a refused one. Skipped, with the reason, where
Chromium, its driver or selenium is missing (.ci/run installs them)."""

import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from server_live import served as serving
from stubs import ScriptedModel, by_prompt, replies

from qwen3_mlx.generation.engine import Engine

REASONING = "The user greets me. I should answer kindly."
ANSWER = "Hello! Here is **bold** text and `code`."
TABLE = "| name | value |\n| --- | --- |\n| a | 1 |\n| b | 2 |"
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


class Probe(ThreadingHTTPServer):
    """A server on its own port that counts the requests it gets (what the page must never fetch)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                probe.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def probe():
    server = Probe()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def served(tiny, probe):
    tok = tiny[1]
    pictures = f'See <img src="{probe.url}/html"> and ![a cat]({probe.url}/markdown) here.'
    model = ScriptedModel(by_prompt(tok, {"forever": endless(tok), "picture": replies(tok, REASONING, pictures),
                                          "table": replies(tok, REASONING, TABLE)}, replies(tok, REASONING, ANSWER)),
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


def in_view(browser, element) -> bool:
    """Whether the element's bottom edge is inside the window."""
    return browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                  "return r.bottom > 0 && r.bottom <= window.innerHeight + 1", element)


def last(browser, selector):
    return browser.find_elements("css selector", selector)[-1]


@pytest.mark.parametrize("width", [1280, 390])
def test_the_newest_answer_is_followed_as_it_streams(browser, served, tmp_path, width):
    engine, server = served
    browser.set_window_size(width, 700)
    try:
        open_page(browser, server.url)
        for turn in range(3):
            ask(browser, "Hello there")
            wait_for(lambda: len(browser.find_elements("css selector", ".assistant .answer strong")) == turn + 1)
            wait_for(lambda: browser.find_element("id", "send").is_enabled())
        ask(browser, "Talk forever")
        wait_for(lambda: browser.execute_script("return document.documentElement.scrollHeight > window.innerHeight "
                                                "+ 200") and "more more" in last(browser, ".assistant .answer").text)
        time.sleep(0.3)  # a few more tokens drawn
        assert in_view(browser, last(browser, ".assistant .answer"))
        assert in_view(browser, browser.find_element("id", "stop")) and in_view(browser, browser.find_element("id",
                                                                                                              "status"))
        browser.save_screenshot(str(tmp_path / f"following-{width}.png"))
        # Scrolled up, the reader stays where they are while the answer goes on.
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        assert browser.execute_script("return window.scrollY") == 0
        browser.find_element("id", "stop").click()
        wait_for(lambda: engine.rows == 0, seconds=5)
        assert (tmp_path / f"following-{width}.png").stat().st_size > 0
    finally:
        browser.set_window_size(1000, 900)


def test_a_cut_answer_keeps_its_note_after_the_usage(browser, served):
    _, server = served
    open_page(browser, server.url)
    browser.execute_script("document.getElementById('max-tokens').value = '6'")
    ask(browser, "Hello there")
    note = wait_for(lambda: (lambda text: "tokens" in text and text)(last(browser, ".assistant .note").text))
    assert note == "Cut at the token limit. 6 tokens"


def test_images_the_model_writes_are_links_never_fetched(browser, served, probe):
    _, server = served
    open_page(browser, server.url)
    ask(browser, "Draw a picture")
    wait_for(lambda: browser.find_elements("css selector", ".assistant a.image-link"))
    wait_for(lambda: browser.find_element("id", "send").is_enabled())
    time.sleep(0.5)
    assert probe.paths == []
    answer = last(browser, ".assistant .answer")
    assert answer.find_elements("tag name", "img") == []
    link = answer.find_element("css selector", "a.image-link")
    assert link.text == "[image: a cat]" and link.get_attribute("href") == probe.url + "/markdown"


def test_a_table_has_borders_and_padding(browser, served):
    _, server = served
    open_page(browser, server.url)
    ask(browser, "Show a table")
    wait_for(lambda: browser.find_elements("css selector", ".assistant .answer td"))
    wait_for(lambda: browser.find_element("id", "send").is_enabled())  # the last redraw done
    cell = browser.find_element("css selector", ".assistant .answer td")
    assert cell.value_of_css_property("border-top-width") == "1px"
    assert cell.value_of_css_property("padding-left") != "0px"


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
        key.send_keys("guess")
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait_for(lambda: "refused the API key" in browser.find_element("id", "status").text)  # checked at once
        ask(browser, "Hello there")
        wait_for(lambda: len(browser.find_elements("css selector", ".assistant .error")) == 2)
        assert "The server refused the API key (401)" in last(browser, ".assistant .error").text
        key.clear()
        key.send_keys("s3cret")
        ask(browser, "Hello there")
        wait_for(lambda: browser.find_elements("css selector", ".assistant .answer strong"))


def test_the_page_is_served_with_its_vendored_libraries_and_no_ui_turns_it_off(served, tiny):
    engine, server = served
    page = httpx.get(server.url + "/", headers={"accept": "text/html"})  # as a browser asks (Ollama's clients: not)
    assert page.status_code == 200 and "/ui/app.js" in page.text
    for path in ("/ui/vendor/marked.umd.js", "/ui/vendor/purify.min.js", "/ui/style.css"):
        assert httpx.get(server.url + path).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    with serving(engine, "stub", ui=False) as bare:
        assert "/ui/app.js" not in httpx.get(bare.url + "/", headers={"accept": "text/html"}).text
        assert httpx.get(bare.url + "/ui/app.js").status_code == 404
