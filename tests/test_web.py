"""The chat page `qwenkit serve` hosts at /, driven in headless Chromium against the demo model."""

import json
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import demo_serve, free_port

pytestmark = pytest.mark.real

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `playwright install` and its downloads are never needed
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# No proxy: a CI proxy from the environment must not stand between the test and 127.0.0.1.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(demo_path, tmp_path_factory):
    port = free_port()
    with demo_serve(tmp_path_factory.mktemp("serve") / "serve.log", port, "--port", str(port)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh profile (empty localStorage) on the chat page; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(server)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def reply_text(page) -> str:
    return page.locator(".message.assistant .content").last.inner_text()


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_chat_streams_stops_and_clears(page, server):
    model_id = json.load(LOCAL.open(f"{server}/v1/models", timeout=10))["data"][0]["id"]
    expect(page.locator("#model-name")).to_have_text(model_id)
    page.fill("#temperature", "0")

    # Every change to the newest reply's length, seen from inside the page, however fast it streams.
    page.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant .content');
            if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    question = "Write a Python function that adds two numbers. Reply with only the code."  # ~20 tokens back
    send(page, question)
    expect(page.locator(".message.user")).to_have_text(question)
    expect(page.locator("#stop")).to_be_hidden(timeout=120_000)
    lengths = {n for n in page.evaluate("window.replyLengths") if n}
    assert len(lengths) >= 2, f"the reply did not stream: lengths seen {lengths}"
    # Qwen2.5-Coder answers with a fenced code block, which the page shows as <pre><code>.
    expect(page.locator(".message.assistant pre code")).not_to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()

    page.reload()  # the conversation survives a reload
    expect(page.locator(".message")).to_have_count(2)

    # Thousands of tokens at temperature 0. Asked plainly, this coder model refuses long essays or,
    # after the code above, answers with a three-line loop: both end before Stop could be pressed.
    send(page, "Now, as plain text and not code, write out every number from 1 to 500 in English words, "
               "one per line.")
    page.wait_for_function("""() => {
        const replies = document.querySelectorAll('.message.assistant .content');
        return replies.length === 2 && replies[1].textContent.length > 100;  // a few list lines to show
    }""", timeout=120_000)
    page.click("#stop")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    stopped_at = reply_text(page)
    time.sleep(1.5)
    assert reply_text(page) == stopped_at, "the reply kept growing after Stop"
    expect(page.locator(".message.assistant .note").last).to_have_text("Stopped.")
    expect(page.locator(".message")).to_have_count(4)  # the partial reply stays in the conversation

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"))
    # Dark mode on a phone-sized window: nothing may stick out sideways.
    page.emulate_media(color_scheme="dark")
    page.set_viewport_size({"width": 390, "height": 844})
    page.click("#settings-toggle")  # open since the wide window; on a phone they would cover the chat
    expect(page.locator("#settings")).to_be_hidden()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(ARTIFACTS / "web-chat-narrow-dark.png"))

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    page.reload()
    expect(page.locator(".message")).to_have_count(0)


def test_api_key_and_error_message(page):
    """A 401 shows the server's message, gives the text back and asks for the key, which is then sent."""
    seen = []

    def fake_api(route):
        seen.append(route.request.headers.get("authorization"))
        if len(seen) == 1:
            route.fulfill(status=401, json={"error": {"message": "Invalid API key"}})
        else:
            route.fulfill(status=200, content_type="text/event-stream", body=(
                'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
                'data: {"choices":[{"index":0,"delta":{"content":"Hello "}}]}\n\n'
                'data: {"choices":[{"index":0,"delta":{"content":"there"},"finish_reason":"stop"}]}\n\n'
                "data: [DONE]\n\n"))

    page.route("**/v1/chat/completions", fake_api)
    send(page, "hi")
    expect(page.locator("#error")).to_contain_text("Invalid API key")
    expect(page.locator("#api-key")).to_be_focused()
    expect(page.locator("#prompt")).to_have_value("hi")
    expect(page.locator(".message")).to_have_count(0)

    page.fill("#api-key", "sk-test")
    page.click("#send")
    expect(page.locator(".message.assistant .content")).to_have_text("Hello there")
    expect(page.locator("#error")).to_be_hidden()
    assert seen == [None, "Bearer sk-test"]


def test_markdown_escapes_html(page):
    html = page.evaluate("""async () => {
        const { renderMarkdown } = await import('./markdown.js');
        const el = document.createElement('div');
        renderMarkdown(el, 'Use `<b>` and **bold** <img src=x onerror="window.pwned=1">\\n\\n' +
                           '```html\\n<script>window.pwned = 1</script>\\n```');
        document.body.append(el);
        return el.innerHTML;
    }""")
    assert "<img" not in html and "&lt;img src=x" in html
    assert "<code>&lt;b&gt;</code>" in html and "<strong>bold</strong>" in html
    assert '<pre><code class="language-html">&lt;script&gt;window.pwned = 1&lt;/script&gt;</code></pre>' in html
    assert page.evaluate("window.pwned") is None
