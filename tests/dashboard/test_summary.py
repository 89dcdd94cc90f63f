"""The dashboard summary without a browser: a loading node, a standalone node, a failing component, and
the coverage map of a served model and its fallback from real announcement records and a real ban list.

These build the app in-process (no server) and call the same function the route runs; the browser test
(test_dashboard_browser.py) covers the real swarm.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from openhydra.api.app import create_app
from openhydra.api.dashboard.coverage import model_coverage
from openhydra.api.dashboard.summary import DashboardSummary, build_summary
from openhydra.api.state import NodeState, ServedModel
from openhydra.config.schema import ApiConfig
from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.bans import BanList


def _served(span: tuple[int, int] = (0, 8)) -> ServedModel:
    return ServedModel(id="tiny", aliases=[], source="/models/tiny", family="llama", parameter_count=3_300_000,
                       dtype="float32", context_length=4096, num_layers=8, span=span)


class _Engine:
    active_sessions = {"a", "b"}
    queued = 3


class _BrokenProvider:
    def network_status(self) -> dict:
        raise RuntimeError("discovery is down")


def test_a_loading_node_reports_its_stage_and_no_coverage() -> None:
    state = NodeState(loading_stage="loading tiny layers [0, 8)")
    summary = build_summary(create_app(state, ApiConfig()))
    assert isinstance(summary, DashboardSummary)
    assert summary.node.ready is False and summary.node.loading_stage == "loading tiny layers [0, 8)"
    assert summary.node.model is None and summary.coverage == []
    assert summary.earnings.enabled is False and summary.earnings.mode == "off"
    assert summary.hardware.cpu_count >= 1 and summary.hardware.torch_version
    assert summary.metrics.requests_total == 0 and summary.load.active_sessions == 0


def test_a_standalone_node_shows_itself_alone_on_the_map() -> None:
    state = NodeState(model=_served(), engine=_Engine(), loading_stage="ready")
    summary = build_summary(create_app(state, ApiConfig(max_concurrent_sessions=4)))
    assert summary.node.ready and summary.node.model.span == (0, 8)
    assert summary.load.active_sessions == 2 and summary.load.max_concurrent_sessions == 4
    assert summary.load.queued_requests == 3
    [entry] = summary.coverage
    assert entry.role == "local" and entry.complete and entry.holes == []
    assert [(p.start, p.end, p.is_self) for p in entry.peers] == [(0, 8, True)]


def test_a_failing_component_is_reported_and_the_rest_still_answers() -> None:
    state = NodeState(model=_served(), engine=_Engine(), loading_stage="ready", extra={"broken": _BrokenProvider()})
    summary = build_summary(create_app(state, ApiConfig()))
    assert summary.network["broken"] == {"error": "RuntimeError: discovery is down"}
    assert summary.node.ready


def _record(peer: str, model: str, start: int, end: int, total: int, port: int) -> PeerAnnouncement:
    return PeerAnnouncement(peer_id=peer, model_id=model, start=start, end=end, total_layers=total,
                            grpc_address=f"127.0.0.1:{port}", announced_at=time.time(), ttl_s=60)


class _Swarm:
    """The two things the map reads from a SwarmPipeline: its peers and its ban list (a real BanList)."""

    model_id, total_layers = "big", 8

    def __init__(self, records: list[PeerAnnouncement]) -> None:
        self.records, self.bans = records, BanList()

    def peers(self) -> list[PeerAnnouncement]:
        return self.records


class _Discovery:
    def __init__(self, records: list[PeerAnnouncement]) -> None:
        self.records = records

    async def lookup(self, model_id: str) -> list[PeerAnnouncement]:
        return [r for r in self.records if r.model_id == model_id]


class _Loop:
    def run(self, coro, timeout: float = 30.0):
        return asyncio.run(coro)


def test_coverage_of_the_served_model_and_of_each_fallback() -> None:
    served = [_record("me", "big", 0, 4, 8, 5001),
              _record("other", "big", 4, 6, 8, 5002).model_copy(update={"backend": "pytorch-int4-lowbit3"})]
    fallback = [_record("small-a", "small", 0, 2, 4, 5003), _record("small-b", "small", 2, 4, 4, 5004)]
    node = SimpleNamespace(swarm=_Swarm(served), peer_server=SimpleNamespace(address="127.0.0.1:5001"),
                           discovery=_Discovery(fallback), background=_Loop())
    node.swarm.bans.ban("other")
    state = NodeState(model=_served((0, 4)), degrader=SimpleNamespace(fallbacks=["small"]))
    big, small = model_coverage(state, node)
    assert (big.model_id, big.role, big.total_layers) == ("big", "served", 8)
    assert big.holes == [(4, 8)] and not big.complete  # the banned peer does not count
    assert [(p.peer_id, p.start, p.end, p.is_self, p.banned) for p in big.peers] == [
        ("me", 0, 4, True, False), ("other", 4, 6, False, True)]
    assert [p.backend for p in big.peers] == ["pytorch", "pytorch-int4-lowbit3"]  # how each computes (tooltip)
    assert (small.model_id, small.role, small.total_layers, small.complete) == ("small", "fallback", 4, True)
    assert [(p.start, p.end) for p in small.peers] == [(0, 2), (2, 4)] and small.counts == [1, 1, 1, 1]


def test_polls_share_one_build_per_second_however_many_come() -> None:
    """The summary's polls come out of the probes' budget (10x the API's), and a build is blocking work (discovery
    lookups, ledger reads): 200 polls at once, and polls all through a 'second', start one build each second."""
    from openhydra.api.routes_dashboard import SummaryCache

    now = [0.0]
    started = []

    def build() -> dict:
        started.append(now[0])
        time.sleep(0.05)  # a build takes a while: callers meanwhile wait for this one
        return {"built": len(started)}

    cache = SummaryCache(build, fresh_s=1.0, clock=lambda: now[0])

    async def polls() -> list[dict]:
        together = await asyncio.gather(*(cache.get() for _ in range(200)))
        later = []
        for i in range(1, 26):
            now[0] = i / 10  # 2.5 s of polls every 100 ms
            later.append(await cache.get())
        return [*together, *later]

    answers = asyncio.run(polls())
    assert answers[:200] == [{"built": 1}] * 200
    assert cache.builds == len(started) == 3  # at 0 s, then once the answer is a second old: 1.0 s and 2.0 s
    assert [a["built"] for a in answers[200:]] == [1] * 9 + [2] * 10 + [3] * 6  # polls at 0.1 ... 2.5 s
