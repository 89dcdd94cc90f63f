"""The dashboard summary without a browser: a loading node, a standalone node, a failing component.

These build the app in-process (no server) and call the same function the route runs; the browser test
(test_dashboard_browser.py) covers the real swarm.
"""

from __future__ import annotations

from openhydra.api.app import create_app
from openhydra.api.dashboard.summary import DashboardSummary, build_summary
from openhydra.api.state import NodeState, ServedModel
from openhydra.config.schema import ApiConfig


def _served(span: tuple[int, int] = (0, 8)) -> ServedModel:
    return ServedModel(id="tiny", aliases=[], source="/models/tiny", family="llama", parameter_count=3_300_000,
                       dtype="float32", context_length=4096, num_layers=8, span=span)


class _Engine:
    active_sessions = {"a", "b"}


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
    [entry] = summary.coverage
    assert entry.role == "local" and entry.complete and entry.holes == []
    assert [(p.start, p.end, p.is_self) for p in entry.peers] == [(0, 8, True)]


def test_a_failing_component_is_reported_and_the_rest_still_answers() -> None:
    state = NodeState(model=_served(), engine=_Engine(), loading_stage="ready", extra={"broken": _BrokenProvider()})
    summary = build_summary(create_app(state, ApiConfig()))
    assert summary.network["broken"] == {"error": "RuntimeError: discovery is down"}
    assert summary.node.ready
