"""The web dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A real swarm runs: an HTTP DHT and two nodes on a tiny Llama, the head (layers [0, 4), a bearer token,
barter economy) and the tail (layers [4, 8), economy=off, no token). The browser opens the head's
dashboard and checks what a user sees: it asks for the token, then shows status and model, both
running peers as bars of the coverage map with their spans, earnings, the refresh clock; then it chats
in the playground and watches the reply stream in (several updates of the reply on screen, and the
final text equal to the node's non-streamed greedy answer through the official openai client), and
stops a long reply with the Stop button. The tail's dashboard shows its own span and economy=off.

Screenshots: set OPENHYDRA_DASHBOARD_SCREENSHOTS=docs/img (what scripts/dashboard_screenshot.py does).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, signal_group, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "Name three rivers."
SCREENSHOTS = os.environ.get("OPENHYDRA_DASHBOARD_SCREENSHOTS")

if os.environ.get("CI"):  # CI installs both (scripts/setup.sh): a missing browser is a failure there
    from playwright import sync_api

    assert CHROMIUM.exists(), "scripts/setup.sh should have installed Debian's chromium"
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def nodes(tiny_model_dirs, tmp_path_factory) -> Iterator[dict[str, NodeProcess]]:
    """head: layers [0, 4), bearer token, barter economy; tail: layers [4, 8), economy=off, open API."""
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        head = NodeProcess([*swarm_node_overrides(model, dht.url, 0, 4, tmp_path_factory.mktemp("head")),
                            f"api.bearer_token={TOKEN}", "economy=barter"])
        tail = NodeProcess([*swarm_node_overrides(model, dht.url, 4, 8, tmp_path_factory.mktemp("tail")),
                            "economy=off"])
        started = [head, tail]
        try:
            start_all(started)
            _wait_for_both_peers(head)
            yield {"head": head, "tail": tail, "dht": dht}
        finally:
            for node in started:  # SIGKILL: this module tests no clean shutdown, and CI time is short
                if node.proc is not None and node.proc.poll() is None:
                    signal_group(node.proc, signal.SIGKILL)
            for node in started:
                node.stop()  # reaps the processes and closes the logs


def _wait_for_both_peers(node: NodeProcess, timeout_s: float = 120.0) -> None:
    def both() -> bool:
        swarm = httpx.get(node.url + "/v1/network/status", headers=AUTH, timeout=10).json().get("swarm") or {}
        return len(swarm.get("peers") or []) == 2 and swarm["pipeline"]["coverage"]["complete"]

    try:
        wait_until(both, timeout_s, 0.3, "the head node to see both peers and complete coverage")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{node.log_text()[-2000:]}") from None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh browser profile: no token stored."""
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    script_errors: list[str] = []
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not script_errors, f"the page's JavaScript threw: {script_errors}"


def _use_token(page) -> None:
    """What pasting the token once does: the page keeps it in localStorage."""
    page.add_init_script(f"localStorage.setItem('openhydra.dashboard.token', {TOKEN!r})")


def _screenshot(page, name: str, selector: str | None = None) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        path = str(Path(SCREENSHOTS) / name)
        if selector is not None:
            page.locator(selector).screenshot(path=path)
            return
        page.evaluate("window.scrollTo(0, 0)")  # the sticky header belongs at the top of a full-page shot
        page.screenshot(path=path, full_page=True)


def _shown_number(page, label: str) -> float:
    """The number a key/value card shows next to ``label``."""
    text = page.locator(f"dt:text-is('{label}') + dd").inner_text()
    return float(text.replace(",", "")) if text.strip() not in ("", "\u2013") else 0.0


def test_page_and_assets_are_served_without_a_build_step(nodes):
    head = nodes["head"]
    index = httpx.get(head.url + "/", timeout=10)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/app.js">' in index.text and "http://" not in index.text.split("<footer")[0]
    assert httpx.get(head.url + "/dashboard/app.js", timeout=10).headers["content-type"].startswith("text/javascript")
    missing = httpx.get(head.url + "/dashboard/nope.js", headers=AUTH, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    paths = httpx.get(head.url + "/openapi.json", headers=AUTH, timeout=10).json()["paths"]
    assert "/v1/dashboard/summary" in paths and "/" not in paths
    # the page is public, the data is not
    assert httpx.get(head.url + "/v1/dashboard/summary", timeout=10).status_code == 401
    summary = httpx.get(head.url + "/v1/dashboard/summary", headers=AUTH, timeout=10).json()
    assert summary["node"]["model"]["span"] == [0, 4] and summary["earnings"]["mode"] == "barter"


def test_dashboard_shows_the_node_and_both_peers_on_the_coverage_map(nodes, page):
    head = nodes["head"]
    status = httpx.get(head.url + "/v1/network/status", headers=AUTH, timeout=10).json()
    expected = {(p["peer_id"], tuple(p["span"])) for p in status["swarm"]["peers"]}
    assert {span for _, span in expected} == {(0, 4), (4, 8)}
    model_id = status["model"]["id"]

    page.goto(head.url + "/")
    # No token yet: the page says so and asks for it.
    page.wait_for_selector("#token-panel:not([hidden])")
    assert "bearer token" in page.inner_text("#error-banner")
    assert page.inner_text("#status-pill") == "unreachable"
    page.fill("#token-input", TOKEN)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#status-pill.pill-ok")
    assert page.inner_text("#status-pill") == "ready"
    assert f"{model_id} · layers [0, 4) of 8" in page.inner_text("#headline-model")
    rows = page.locator(f'.cov-model[data-model-id="{model_id}"] .cov-row[data-peer-id]')
    rows.nth(1).wait_for()
    shown = {(rows.nth(i).get_attribute("data-peer-id"),
              (int(rows.nth(i).get_attribute("data-start")), int(rows.nth(i).get_attribute("data-end"))))
             for i in range(rows.count())}
    assert shown == expected
    bars = [rows.nth(i).locator(".cov-bar").inner_text() for i in range(rows.count())]
    assert sorted(bars) == ["[0, 4)", "[4, 8)"]
    own = page.locator(".cov-row:has(.badge:text('this node'))")
    assert own.count() == 1 and own.get_attribute("data-start") == "0"
    assert "complete" in page.inner_text(f'.cov-model[data-model-id="{model_id}"] .cov-head')
    # bars are drawn to scale over [0, L): each half of the track
    widths = [rows.nth(i).locator(".cov-bar").bounding_box()["width"] for i in range(2)]
    track = rows.nth(0).locator(".cov-track").bounding_box()["width"]
    assert all(abs(w - track / 2) < 3 for w in widths), (widths, track)

    assert "barter" in page.inner_text("#earnings-info") and "credits" in page.inner_text("#earnings-info")
    assert "torch" in page.inner_text("#hardware-info")
    first = page.inner_text("#last-updated")
    assert first != "never"
    page.wait_for_function("t => document.getElementById('last-updated').textContent !== t", arg=first)
    assert page.locator("#error-banner").is_hidden()


def test_chat_playground_streams_the_reply(nodes, page):
    head = nodes["head"]
    _use_token(page)
    page.goto(head.url + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    model_id = page.input_value("#chat-model")
    page.fill("#chat-max-tokens", "16")
    page.fill("#chat-temperature", "0")
    # Record every text the reply shows while it streams: each render replaces the body's text node, so every
    # added text node is one rendered state, also when the browser hands several renders to one observer callback
    # (a fast machine delivered the whole 16-token reply in one network read: reading the body once per callback
    # then saw only the final text).
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver((records) => {
            for (const record of records) {
                const body = record.target.closest ? record.target.closest('.msg-assistant .msg-body') : null;
                if (!body || body !== document.querySelector('.msg-assistant:last-child .msg-body')) continue;
                for (const node of record.addedNodes) {
                    const text = node.textContent;
                    if (text && window.__seen.at(-1) !== text) window.__seen.push(text);
                }
            }
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-input", PROMPT)
    page.click("#chat-send")
    reply = page.locator(".msg-assistant").last
    page.wait_for_selector('.msg-assistant[data-state="done"]')
    text = reply.locator(".msg-body").inner_text()
    seen = page.evaluate("window.__seen")
    assert int(reply.get_attribute("data-chunks")) > 1
    assert len(seen) > 1 and seen[-1] == text and all(text.startswith(s) for s in seen), seen
    client = openai.OpenAI(base_url=head.url + "/v1", api_key=TOKEN)
    expected = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=16, temperature=0)
    assert text == expected.choices[0].message.content
    assert "chunk(s)" in page.inner_text("#chat-stats")
    # The live metrics pick both generations up on a later poll.
    served = httpx.get(head.url + "/v1/dashboard/summary", headers=AUTH, timeout=10).json()
    generated = served["metrics"]["tokens_generated_total"]
    assert generated >= 32
    deadline = time.monotonic() + 10
    while _shown_number(page, "tokens generated") < generated and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert _shown_number(page, "tokens generated") >= generated
    if SCREENSHOTS:
        page.wait_for_function("state.tokenRates.length >= 3")  # a few points on the sparkline
    _screenshot(page, "dashboard.png")
    _screenshot(page, "dashboard-chat.png", selector="article:has(#chat-log)")

    # A long reply stopped with the Stop button: the stream is cut and the page says so.
    page.fill("#chat-max-tokens", "400")
    page.fill("#chat-input", "Tell me a long story.")
    page.click("#chat-send")
    page.wait_for_selector('.msg-assistant[data-state="streaming"]')
    page.click("#chat-stop")
    page.wait_for_selector('.msg-assistant[data-state="stopped"]')
    assert page.is_enabled("#chat-send") and page.locator("#error-banner").is_hidden()


def test_node_with_economy_off_shows_its_own_span_and_no_earnings(nodes, page):
    tail = nodes["tail"]
    page.goto(tail.url + "/")  # no token configured on this node: no prompt
    page.wait_for_selector("#status-pill.pill-ok")
    assert page.locator("#token-panel").is_hidden() and page.locator("#error-banner").is_hidden()
    assert "economy=off" in page.inner_text("#earnings-info")
    own = page.locator(".cov-row:has(.badge:text('this node'))")
    own.wait_for()
    assert (own.get_attribute("data-start"), own.get_attribute("data-end")) == ("4", "8")
    assert page.locator(".cov-row[data-peer-id]").count() == 2


def test_a_dead_peer_shows_as_an_error_and_a_coverage_hole(nodes, browser):
    """Runs last: it stops the tail (SIGSTOP), kills it, then the DHT. The tail's own page says the node does not
    answer, then that it cannot reach the node (keeping the last data), and the head's map loses the bar and shows
    the hole [4, 8); with the DHT gone, the head's page says the DHT is unreachable and keeps its own bar."""
    head, tail = nodes["head"], nodes["tail"]
    tail_page = browser.new_page()
    head_page = browser.new_page()
    head_page.add_init_script(f"localStorage.setItem('openhydra.dashboard.token', {TOKEN!r})")
    try:
        tail_page.goto(tail.url + "/")
        tail_page.wait_for_selector("#status-pill.pill-ok")
        head_page.goto(head.url + "/")
        head_page.wait_for_selector(".cov-row[data-peer-id] >> nth=1")
        # A hung node (stopped: the kernel still accepts the connection) is reported too, not only a dead one: a
        # probe found the page "ready" with no banner, its poll waiting forever and every later poll skipped.
        signal_group(tail.proc, signal.SIGSTOP)
        try:
            tail_page.wait_for_selector("#error-banner:not([hidden])", timeout=30_000)
            assert "the node did not answer within 10 s" in tail_page.inner_text("#error-banner")
            assert tail_page.inner_text("#status-pill") == "unreachable"
        finally:
            tail.kill()  # SIGKILL ends a stopped process too
        tail_page.wait_for_function(
            "document.getElementById('error-banner').textContent.includes('cannot reach the node')", timeout=30_000)
        assert "cannot reach the node" in tail_page.inner_text("#error-banner")
        assert "showing data from" in tail_page.inner_text("#error-banner")
        assert tail_page.inner_text("#status-pill") == "unreachable"
        head_page.wait_for_selector(".cov-head .pill-bad:text('holes [4, 8)')", timeout=30_000)
        assert head_page.locator(".cov-row[data-peer-id]").count() == 1
        assert head_page.locator("#load-info dt:text-is('DHT') + dd").inner_text() == "reachable"
        # Then the DHT dies: the head says so, and still shows (and routes over) its own span.
        nodes["dht"].__exit__(None, None, None)
        dht_row = head_page.locator("#load-info dt:text-is('DHT') + dd.bad")
        dht_row.wait_for(timeout=30_000)
        assert dht_row.inner_text().startswith("unreachable: routing over the peers it knew and this node")
        own = head_page.locator(".cov-row[data-peer-id]")
        assert own.count() == 1 and own.get_attribute("data-start") == "0"
    finally:
        tail_page.close()
        head_page.close()
