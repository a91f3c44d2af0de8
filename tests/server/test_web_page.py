"""The chat page at `/` of `serve`, driven in a real headless Chromium (the system's, through
Playwright): streaming, stop, API key, conversation storage and safe rendering.

The browser is Debian's `chromium` (`.ci/run` installs it); Playwright's own browser download
is not used. Without a browser the browser tests skip, unless CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, metric

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the package supports 3.10; its tests read pyproject with tomllib
    tomllib = None

KEY = "web-page-key"
STATIC = Path(__file__).parents[2] / "src" / "mistral7b" / "server" / "static"
POLL_S = 0.01


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "server.log"
    srv = ServerProcess(["--quant", "none", "--api-key", KEY, "--max-concurrency", "4"], log)
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture
def api(web_server):
    with httpx.Client(base_url=web_server.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def _no_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true needs the browser test (.ci/run installs chromium)")
    pytest.skip(f"{reason} (install Debian's chromium; CI=true makes this a failure)")


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        _no_browser("no chromium on PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed (the dev extra)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, web_server):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{web_server.url}/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _use_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")


def _settings(page, *, temperature: str, max_tokens: str) -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def _assistant_text(page, index: int) -> str:
    return page.evaluate("i => { const m = document.querySelectorAll('#messages .msg.assistant')[i];"
                         " return m ? m.querySelector('.content').textContent : ''; }", index)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- over HTTP


def test_page_is_open_under_api_key_and_the_api_is_not(web_server):
    page = httpx.get(f"{web_server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    for name in re.findall(r'(?:src|href)="/static/([^"]+)"', page.text):
        asset = httpx.get(f"{web_server.url}/static/{name}")
        assert asset.status_code == 200, name
        assert asset.content == (STATIC / name).read_bytes()
    assert httpx.get(f"{web_server.url}/static/missing.js").status_code == 404
    denied = httpx.get(f"{web_server.url}/v1/models")
    assert denied.status_code == 401
    assert "Incorrect API key" in denied.json()["error"]["message"]


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_static_files_are_package_data():
    """A non-editable install carries the page: pyproject's package-data covers every file."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["mistral7b.server"]
    shipped = {p for g in globs for p in (STATIC.parent).glob(g)}
    assert {p for p in STATIC.iterdir() if p.is_file()} <= shipped
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in shipped}


# ----------------------------------------------------------------------------- in the browser


def test_wrong_api_key_shows_the_servers_error(page):
    # No key at all: the model list is refused, and the page says why.
    page.wait_for_selector("#error:not([hidden])")
    assert "Incorrect API key" in page.inner_text("#error")
    _use_key(page, "not-the-key")
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_selector("#error:not([hidden])")
    assert "Incorrect API key" in page.inner_text("#error")
    assert page.locator("#messages .msg.assistant").count() == 0   # nothing answered
    _use_key(page, KEY)
    page.wait_for_selector("#model option[value=default]", state="attached")
    page.wait_for_selector("#error", state="hidden")


def test_streams_stops_frees_the_row_and_continues(page, api):
    _use_key(page, KEY)
    page.wait_for_selector("#model option[value=default]", state="attached")
    _settings(page, temperature="0", max_tokens="4000")
    cancelled = _finished(api, "cancelled")
    page.fill("#prompt", "Write a very long story about a dragon who learns to cook.")
    page.click("#send")

    # The answer grows over several polls while the stream is still open.
    lengths: list[int] = []
    deadline = time.monotonic() + 30
    while len(lengths) < 4:
        assert time.monotonic() < deadline, f"the answer did not grow: {lengths}"
        assert page.is_visible("#stop"), f"the answer ended before it could be stopped: {lengths}"
        n = len(_assistant_text(page, 0))
        if n and (not lengths or n != lengths[-1]):
            lengths.append(n)
        time.sleep(POLL_S)
    assert lengths == sorted(lengths) and len(set(lengths)) >= 2
    assert metric(api, "mistral7b_running_sequences") == 1

    page.click("#stop")
    page.wait_for_selector("#messages .msg.assistant .badge.stopped")
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    stopped_text = _assistant_text(page, 0)
    assert len(stopped_text) >= lengths[-1]
    _wait(lambda: metric(api, "mistral7b_running_sequences") == 0, 15, "the row to be freed")
    _wait(lambda: _finished(api, "cancelled") == cancelled + 1, 15, "the cancel to be counted")
    assert page.is_hidden("#error")

    # A new message in the same conversation gets its own answer.
    _settings(page, temperature="0", max_tokens="8")
    page.fill("#prompt", "Say hello.")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#messages .msg.assistant >> nth=1")
    page.wait_for_selector("#stop", state="hidden", timeout=30_000)
    assert page.locator("#messages .msg").count() == 4
    assert _assistant_text(page, 1)
    assert page.locator("#messages .msg.assistant >> nth=1").locator(".badge.stopped").count() == 0
    assert page.is_hidden("#error")
    assert _assistant_text(page, 0) == stopped_text     # the stopped answer is kept as it was
    assert metric(api, "mistral7b_running_sequences") == 0


def test_conversation_survives_reload_and_renders_text_safely(page):
    hostile = "<img src=x onerror=\"document.title='pwned'\"> and `inline <b>code</b>`"
    code = "def add(a, b):\n    return a + b  # <script>alert(1)</script>"
    answer = f"{hostile}\n\n```python\n{code}\n```\nafter"
    page.evaluate("c => localStorage.setItem('mistral7b.chat', JSON.stringify(c))",
                  [{"role": "user", "content": "show me"},
                   {"role": "assistant", "content": answer, "status": "done"}])
    page.reload()
    page.wait_for_selector("#messages .msg.assistant")
    assert page.locator("#messages .msg").count() == 2
    content = page.locator("#messages .msg.assistant .content")
    assert content.locator("pre code").inner_text() == code
    assert content.locator("pre").get_attribute("data-lang") == "python"
    assert content.locator("p code").inner_text() == "inline <b>code</b>"
    assert content.locator("img, b, script").count() == 0     # model text never became HTML
    assert "<img src=x" in content.inner_text()
    assert page.title() != "pwned"

    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0
    page.reload()
    page.wait_for_load_state("load")
    assert page.locator("#messages .msg").count() == 0


def _finished(api: httpx.Client, reason: str) -> float:
    found = re.search(rf'^mistral7b_request_finish_total{{reason="{reason}"}} (\S+)$',
                      api.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
