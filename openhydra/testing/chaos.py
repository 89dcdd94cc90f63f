"""A chaos run: a real swarm under steady load while peers are killed, stopped and restarted.

Layout: the HTTP DHT, a coordinator node that holds only layer ``[0, 1)`` (no peer starts at layer 1, so its own
peer can never be a hop of an exactly tiling chain: it only coordinates), and ``replicas`` peer processes for each
of ``spans`` equal spans of the model. The expected text of every prompt is computed first on the swarm with no
fault; then ``streams`` greedy streams run for ``duration_s`` through the official ``openai`` client while the
:class:`~openhydra.testing.chaos_faults.Killer` acts every ``kill_every_s``. Used by ``bench/chaos.py`` and
``tests/swarm/test_chaos.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from openhydra.hardware.cpuinfo import cpu_model, cpuinfo_flags
from openhydra.loadgen.metrics import percentile
from openhydra.testing.chaos_faults import ChaosPeer, FaultEvent, Killer, PeerState, span_key
from openhydra.testing.chaos_load import CHAOS_PROMPTS, LoadGenerator, Outcome, RequestResult, expected_texts
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

CPU_FLAGS_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni",
                         "amx_bf16", "amx_tile")


class ChaosConfig(BaseModel):
    model_dir: Path
    work_dir: Path
    """Node logs and data directories go here."""
    duration_s: float = Field(300.0, gt=0)
    """Streams start new requests this long; faults happen this long."""
    streams: int = Field(4, ge=1, le=64)
    seed: int = 0
    kill_every_s: float = Field(10.0, gt=0)
    stop_s: tuple[float, float] = (3.0, 8.0)
    """A SIGSTOP'd peer is continued after a uniform draw from this range, s."""
    max_tokens: int = Field(48, ge=1)
    spans: int = Field(3, ge=1)
    replicas: int = Field(2, ge=2)
    hang_s: float = Field(60.0, gt=0)
    """No progress for longer than this is a hang (also the client's read timeout)."""
    dtype: str = "float32"
    prompts: list[str] = Field(default_factory=lambda: list(CHAOS_PROMPTS), min_length=1)


class Stalls(BaseModel):
    p50_s: float | None
    p95_s: float | None
    max_s: float | None


class ChaosReport(BaseModel):
    config: dict
    environment: dict
    layout: list[dict]
    started: int
    outcomes: dict[str, int]
    """Requests per outcome (ok, wrong_text, typed_error, hung, untyped_error)."""
    completed_fraction: float
    stalls: Stalls
    """Over every request that ended: its largest gap with no new token."""
    content_chunks: int
    events: list[FaultEvent]
    event_counts: dict[str, int]
    min_live: dict[str, int]
    """The fewest live replicas each span had at any fault event (0 would be a bug of the harness)."""
    errors: dict[str, int]
    """Non-ok requests by (outcome, error kind, status, code)."""
    coordinator: dict
    """The coordinator's pipeline status at the end (failovers, replay mismatches, bans) and its settlements."""
    coordinator_timeline: list[dict]
    """Once a second during the load: the coordinator's failover count, banned peers and active sessions."""
    coordinator_log: list[str]
    """Its lines about failures, bans, timeouts and replays, at most the last 200."""
    requests: list[RequestResult]
    wall_s: float

    def count(self, outcome: Outcome) -> int:
        return self.outcomes.get(outcome.value, 0)

    def problems(self, min_completed: float = 0.99) -> list[str]:
        """What breaks the bar (issue 14): any hang, wrong text or untyped error (so every request that did not
        complete ended with a typed error), fewer than ``min_completed`` completed, a span left empty."""
        problems = []
        for outcome in (Outcome.HUNG, Outcome.WRONG_TEXT, Outcome.UNTYPED_ERROR):
            if self.count(outcome):
                problems.append(f"{self.count(outcome)} request(s) {outcome.value}")
        if self.completed_fraction < min_completed:
            problems.append(f"only {self.completed_fraction:.1%} completed with the expected text "
                            f"(bar {min_completed:.0%})")
        if any(n < 1 for n in self.min_live.values()):
            problems.append(f"a span had no live replica: {self.min_live}")
        if self.coordinator.get("replay_mismatches"):
            problems.append(f"{self.coordinator['replay_mismatches']} replay mismatches at the coordinator")
        return problems


def _settlements(coordinator: NodeProcess, wait_s: float = 30.0) -> dict:
    """The coordinator's settlement counts once its queue drained (settled, failed by stage, receipts the hops
    applied): a request whose final chain lost a hop before its settlement ran is not paid, nothing else should
    fail."""
    keys = ("settled", "failed", "failures_by_stage", "peer_applied", "peer_failed", "queued")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = httpx.get(coordinator.url + "/v1/network/status", timeout=10).json().get("settlement") or {}
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": str(exc)}
        if not status.get("queued") or time.monotonic() > deadline:
            return {k: status.get(k) for k in keys if k in status}
        time.sleep(0.5)


def equal_spans(num_layers: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    spans = list(itertools.pairwise(bounds))
    if any(a >= b for a, b in spans) or spans[0][1] <= 1:
        raise ValueError(f"cannot cut {num_layers} layers into {parts} spans that each start past layer 1")
    return spans


def environment() -> dict:
    """Load average, CPU model and flags, versions: printed and stored with every result."""
    import importlib.metadata as md

    model, flags = cpu_model() or platform.processor() or "unknown", cpuinfo_flags() or frozenset()
    versions = {}
    for package in ("torch", "transformers", "openai", "grpcio", "sanic", "openhydra-network"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "hostname": platform.node(),
    }


def _wait_for_coverage(coordinator: NodeProcess, peers: int, timeout_s: float = 60.0) -> None:
    """Until the coordinator's discovery lists every peer and the model is covered."""
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        status = httpx.get(coordinator.url + "/v1/network/status", timeout=10).json().get("swarm") or {}
        listed = len(status.get("peers") or [])
        if (status.get("pipeline") or {}).get("coverage", {}).get("complete") and listed >= peers:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the coordinator did not see {peers} peers covering the model: {status}")


_LOG_LINE = re.compile(r"fail|ban|error|timed? ?out|deadline|replay|mismatch|unavailable|refus|gave up|giving up|"
                       r"traceback|exception|warning", re.IGNORECASE)


def _coordinator_log(node: NodeProcess, limit: int = 200) -> list[str]:
    """Its failover story: failures, bans, timeouts, replays (the node logs bare messages, no level)."""
    lines = [line for line in node.log_text().splitlines()
             if _LOG_LINE.search(line) and not line.startswith("HTTP Request:")]
    return [line[:400] for line in lines[-limit:]]


def _pipeline_sample(coordinator: NodeProcess, t_s: float) -> dict | None:
    """The coordinator's failover counters now (None when it does not answer within 5 s)."""
    try:
        pipeline = httpx.get(coordinator.url + "/v1/network/status", timeout=5).json()["swarm"]["pipeline"]
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return None
    return {"t_s": round(t_s, 2), "failovers": pipeline.get("failovers"), "banned": len(pipeline.get("banned") or []),
            "active_sessions": pipeline.get("active_sessions")}


def run_chaos(cfg: ChaosConfig, progress: Callable[[str], None] = print) -> ChaosReport:
    """Build the swarm, compute the expected texts, run load and faults, tear everything down, report."""
    wall0 = time.monotonic()
    env = environment()
    num_layers = json.loads((cfg.model_dir / "config.json").read_text())["num_hidden_layers"]
    spans = equal_spans(num_layers, cfg.spans)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    model = cfg.model_dir.name
    with DhtProcess() as dht:
        coordinator = NodeProcess(
            swarm_node_overrides(cfg.model_dir, dht.url, 0, 1, cfg.work_dir / "coordinator", dtype=cfg.dtype),
            log_path=cfg.work_dir / "coordinator.log")
        peers = [ChaosPeer(f"s{s}r{r}", span, cfg.model_dir, dht.url, cfg.work_dir / f"s{s}r{r}", cfg.work_dir,
                           cfg.dtype)
                 for s, span in enumerate(spans) for r in range(cfg.replicas)]
        killer = Killer(peers, every_s=cfg.kill_every_s, seed=cfg.seed, stop_s=cfg.stop_s,
                        on_event=lambda e: progress(
                            f"[{e.t_s:7.1f}s] {e.kind:12s} {e.peer} span {list(e.span)} pid {e.pid} "
                            f"{e.grpc or ''} live {e.live}"))
        try:
            progress(f"starting the DHT, a coordinator and {len(peers)} peers on spans {spans} x {cfg.replicas}")
            start_all([coordinator, *(p.new_process() for p in peers)])
            for peer in peers:
                peer.state = PeerState.LIVE
                peer.learn_address()
            _wait_for_coverage(coordinator, len(peers) + 1)
            layout = [{"name": "coordinator", "span": [0, 1], "role": "coordinator (never faulted)",
                       "api": coordinator.url}]
            layout += [{"name": p.name, "span": list(p.span), "role": "replica", "grpc": p.grpc_address}
                       for p in peers]
            base_url = coordinator.url + "/v1"
            progress(f"computing the expected text of {len(cfg.prompts)} prompts on the swarm with no fault")
            expected = expected_texts(base_url, model, cfg.prompts, cfg.max_tokens, timeout_s=cfg.hang_s)

            def on_result(r: RequestResult) -> None:
                if r.outcome is not Outcome.OK:
                    detail = r.error.model_dump(exclude_none=True) if r.error else {"text": (r.text or "")[:80]}
                    progress(f"[{r.ended_s:7.1f}s] request   stream {r.stream} prompt {r.prompt} {r.outcome.value} "
                             f"after {len(r.chunk_times_s)} chunks, stall {r.stall_s:.1f}s: {detail}")

            timeline: list[dict] = []
            load = LoadGenerator(base_url, model, cfg.prompts, expected, streams=cfg.streams,
                                 max_tokens=cfg.max_tokens, hang_s=cfg.hang_s, on_result=on_result)
            progress(f"chaos: {cfg.streams} streams for {cfg.duration_s:.0f} s, a fault every ~{cfg.kill_every_s} s "
                     f"(seed {cfg.seed})")
            load.start(cfg.duration_s)
            killer.start(t0=load.t0)
            next_line = 10.0
            while time.monotonic() < load.stop_at:
                time.sleep(min(1.0, max(0.0, load.stop_at - time.monotonic())))
                sample = _pipeline_sample(coordinator, load.now_s())
                if sample is not None:
                    timeline.append(sample)
                if load.now_s() >= next_line:
                    next_line += 10.0
                    done = Counter(r.outcome.value for r in list(load.results) if r.outcome is not None)
                    chunks = sum(len(r.chunk_times_s) for r in list(load.results))
                    progress(f"[{load.now_s():7.1f}s] progress  started {len(load.results)} {dict(done)} "
                             f"{chunks / load.now_s():.1f} chunks/s, live {killer.live_counts()}, "
                             f"load {os.getloadavg()[0]:.1f}")
            killer.halt()
            progress(f"[{load.now_s():7.1f}s] faults over; waiting for the streams' last requests")
            results = load.join(grace_s=cfg.hang_s + 15)
            try:
                coordinator_status = httpx.get(coordinator.url + "/v1/network/status",
                                               timeout=10).json()["swarm"]["pipeline"]
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                coordinator_status = {"error": str(exc)}
            coordinator_status = {k: coordinator_status.get(k) for k in
                                  ("failovers", "replay_mismatches", "banned", "coverage", "active_sessions",
                                   "error") if k in coordinator_status}
            coordinator_status["settlement"] = _settlements(coordinator)
        finally:
            if coordinator.proc is not None and coordinator.proc.poll() is None:
                coordinator.proc.terminate()  # it shuts down while the peers do
            killer.shutdown()
            coordinator.stop()
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    ended = [r for r in results if r.ended_s is not None or r.outcome is Outcome.HUNG]
    stalls = [r.stall_s for r in ended]
    outcomes = Counter(r.outcome.value for r in results)
    errors = Counter(
        f"{r.outcome.value} {r.error.kind} {r.error.status or ''} {r.error.code or ''}".strip() if r.error
        else r.outcome.value for r in results if r.outcome is not Outcome.OK)
    return ChaosReport(
        config=cfg.model_dump(mode="json"), environment=env, layout=layout, started=len(results),
        outcomes={o.value: outcomes.get(o.value, 0) for o in Outcome},
        completed_fraction=round(outcomes.get(Outcome.OK.value, 0) / len(results), 4) if results else 0.0,
        stalls=Stalls(p50_s=percentile(stalls, 50), p95_s=percentile(stalls, 95), max_s=max(stalls, default=None)),
        content_chunks=sum(len(r.chunk_times_s) for r in results), events=killer.events,
        event_counts=dict(Counter(e.kind for e in killer.events)),
        min_live={span_key(s): killer.min_live.get(span_key(s), cfg.replicas) for s in spans},
        errors=dict(errors), coordinator=coordinator_status, coordinator_timeline=timeline,
        coordinator_log=_coordinator_log(coordinator),
        requests=results, wall_s=round(time.monotonic() - wall0, 1),
    )
