"""A real Prometheus (Debian's package) scrapes a real 2-node swarm; every dashboard query returns data.

Node A holds every layer (it serves its own requests and settles them in its ledger, and serves peers);
node B holds layers [0, 4) and coordinates a pipeline through the swarm, with verification on. Chat
requests go to both through the official OpenAI client. Prometheus scrapes both every second; then
through its HTTP API: both targets are up, every metric a dashboard query names is in the nodes'
exposition, and every query of ops/grafana/dashboards/openhydra.json returns a sample. Queries of
events this traffic cannot cause (failovers, errors, ...) may be 0; every other one must be > 0.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from openhydra.testing.processes import DhtProcess, NodeProcess, free_port, signal_group, swarm_node_overrides
from openhydra.testing.wait import wait_until
from tests.ops.dashboard import load_dashboard, metric_names, panel_queries, sample_names

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (scripts/setup.sh installs Debian's package)"),
]

# Panels of events that a healthy run without faults does not produce: their queries must return a
# sample (the series exist from the start), which may be 0.
MAY_BE_ZERO = {
    "HTTP 5xx ratio", "Active sessions", "Rate limited / stream errors", "Hop errors / s by status",
    "Failovers, bans, replays (1 h)", "No route (503) per s", "Steps in flight / failures",
    "Audits / s by tier", "Verdicts and failed audits (1 h)", "Ledger errors / s",
}
# Query targets (panel, legend) allowed to be 0 inside panels that must otherwise show traffic.
MAY_BE_ZERO_TARGETS = {
    ("Verification cost (re-executed / user positions)", "re-executed positions/s"),  # no second peer of B's span
}
MESSAGES = [{"role": "user", "content": "Name two colours."}]


def _prometheus_config(path: Path, targets: list[str]) -> None:
    quoted = ", ".join(f'"{t}"' for t in targets)
    path.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: openhydra\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: [{quoted}]\n"
    )


class PrometheusServer:
    """Debian's ``prometheus`` on a free loopback port, with its config and TSDB under ``work``."""

    def __init__(self, work: Path, targets: list[str]) -> None:
        self.work, self.port = work, free_port()
        _prometheus_config(work / "prometheus.yml", targets)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = open(self.work / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.work / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.work / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{(self.work / 'prometheus.log').read_text()[-3000:]}")
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200

        try:
            wait_until(ready, timeout_s, 0.2, f"prometheus ready on {self.url}", ignore=httpx.HTTPError)
        except AssertionError as exc:
            pytest.fail(f"{exc}\n{(self.work / 'prometheus.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture(scope="module")
def stack(tiny_model_dirs, tmp_path_factory):
    """(model name, node A, node B, Prometheus URL); Prometheus starts while the nodes load."""
    model_dir = tiny_model_dirs["llama"]
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    with DhtProcess() as dht:
        full = NodeProcess(swarm_node_overrides(model_dir, dht.url, 0, 8, a), log_path=a / "node.log")
        coordinator = NodeProcess([*swarm_node_overrides(model_dir, dht.url, 0, 4, b), "verification=default",
                                   "verification.sample_rate=1.0"], log_path=b / "node.log")
        nodes = [full, coordinator]
        prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{n.port}" for n in nodes])
        try:
            for node in nodes:
                node.start()
            prometheus.start()
            prometheus.wait_ready()
            for node in nodes:
                node.wait_ready(120)
            yield model_dir.name, full, coordinator, prometheus.url
        finally:
            prometheus.stop()
            _stop_all(nodes)


def _stop_all(nodes: list[NodeProcess], grace_s: float = 3.0) -> None:
    """SIGTERM every node at once, SIGKILL what is still running after ``grace_s``."""
    running = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
    for node in running:
        signal_group(node.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for node in running:
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.kill()
    for node in nodes:
        node.stop()  # closes the log file; nothing left to signal


def _query(url: str, expr: str) -> list[dict]:
    body = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    assert body["data"]["resultType"] == "vector", expr
    return body["data"]["result"]


def _positive(result: list[dict]) -> bool:
    values = [float(sample["value"][1]) for sample in result]
    return any(math.isfinite(v) and v > 0 for v in values)


def _chat(node: NodeProcess, model: str) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens > 0


def _wait_until_up(url: str, targets: int, timeout_s: float = 120) -> list[dict]:
    def all_up() -> list[dict] | None:
        up = _query(url, 'up{job="openhydra"}')
        return up if len(up) == targets and all(s["value"][1] == "1" for s in up) else None

    return wait_until(all_up, timeout_s, 0.5, f"{targets} scrape targets up")


def _scraped_after(url: str, targets: int, t: float) -> bool:
    """Both targets were scraped (successfully) after unix time ``t``."""
    up = _query(url, 'timestamp(up{job="openhydra"} == 1)')
    return len(up) == targets and all(float(s["value"][1]) > t for s in up)


def test_prometheus_scrapes_the_nodes_and_every_dashboard_query_returns_data(stack):
    model, full, coordinator, prometheus = stack
    up = _wait_until_up(prometheus, 2)
    assert {s["metric"]["instance"] for s in up} == {f"127.0.0.1:{full.port}", f"127.0.0.1:{coordinator.port}"}

    # the dashboard names only metrics that the running nodes export
    exported: set[str] = set()
    for node in (full, coordinator):
        text = httpx.get(node.url + "/metrics", timeout=10).text
        exported |= sample_names((f.name, f.type) for f in text_string_to_metric_families(text))
    queries = panel_queries(load_dashboard())
    for title, expr in queries:
        assert metric_names(expr) <= exported, f"{title}: {sorted(metric_names(expr) - exported)} not exported"

    # traffic in rounds until every query that must show traffic does (rates need two scrapes apart)
    legends = {(p["title"], t["expr"]): t["legendFormat"] for p in load_dashboard()["panels"] for t in
               p.get("targets", [])}
    must_be_positive = [(title, expr) for title, expr in queries if title not in MAY_BE_ZERO
                        and (title, legends[(title, expr)]) not in MAY_BE_ZERO_TARGETS]
    deadline = time.monotonic() + 180  # a few rounds on a quiet machine; generous for a loaded one
    missing, rounds = must_be_positive, 0
    while missing:
        assert time.monotonic() < deadline, f"no data after {rounds} rounds of traffic: {missing}"
        _chat(full, model)
        _chat(coordinator, model)
        rounds += 1
        sent = time.time()
        wait_until(lambda t=sent: _scraped_after(prometheus, 2, t), 60, 0.2, "a scrape of both nodes after traffic")
        missing = [(title, expr) for title, expr in missing if not _positive(_query(prometheus, expr))]

    for title, expr in queries:
        assert _query(prometheus, expr), f"{title}: {expr} returned no sample"
    # B's requests ran as pipeline steps through the swarm, and A's peer served them
    hops = _query(prometheus, "max(openhydra_pipeline_hops_count)")
    assert float(hops[0]["value"][1]) > 0
    served = _query(prometheus, f'sum(openhydra_peer_steps_total{{instance="127.0.0.1:{full.port}"}})')
    assert float(served[0]["value"][1]) > 0
