"""A hole in the swarm's coverage is waited for once: the first request waits ``route_wait_s`` for a peer to
(re)appear, the requests that keep meeting the same hole get their 503 after one fresh lookup, and after a quiet
spell (no request met it for ``route_wait_s``) a request waits afresh. ``route_report`` (what /readyz reads) names
the hole. Counted in lookups, not timed."""

from __future__ import annotations

import time

import pytest

from openhydra.router.swarm import FailoverTunables, PipelineUnavailable, SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from tests.router.scripted import ScriptedClient, announcement

WAIT_S = 1.0


@pytest.fixture
def swarm():
    records = [announcement("a", 0, 2)]  # nobody serves [2, 4)
    lookups = [0]

    def lookup():
        lookups[0] += 1
        return list(records)

    pipeline = SwarmPipeline("m", 4, lookup, ScriptedClient(), tunables=FailoverTunables(route_wait_s=WAIT_S))
    return pipeline, records, lookups


def _lookups_for_a_request(swarm, lookups, session: str, served: bool = False) -> int:
    before = lookups[0]
    if served:
        assert swarm.step(session, [1, 2], 0, SamplingParams(), 0) == 7
    else:
        with pytest.raises(PipelineUnavailable, match=r"holes: \[\[2, 4\]\]"):
            swarm.step(session, [1, 2], 0, SamplingParams(), 0)
    return lookups[0] - before


def test_a_known_hole_is_waited_for_once(swarm):
    pipeline, records, lookups = swarm
    assert pipeline.route_report() == (False, [[2, 4]])
    assert _lookups_for_a_request(pipeline, lookups, "s1") >= 2  # waited, looking again every 0.25 s
    for i in range(3):
        assert _lookups_for_a_request(pipeline, lookups, f"k{i}") == 1  # known: one fresh lookup, then 503

    records.append(announcement("b", 2, 4))  # a peer for the hole appears: the next request is served
    assert _lookups_for_a_request(pipeline, lookups, "s2", served=True) == 1
    assert pipeline.route_report() == (True, [])

    records.pop()  # a new hole: waited for again, since the last one closed
    assert _lookups_for_a_request(pipeline, lookups, "s3") >= 2


def test_a_hole_met_again_after_a_quiet_spell_is_waited_for_again(swarm):
    pipeline, _records, lookups = swarm
    assert _lookups_for_a_request(pipeline, lookups, "s1") >= 2
    assert _lookups_for_a_request(pipeline, lookups, "s2") == 1
    time.sleep(WAIT_S + 0.2)  # the quiet spell is the behaviour under test: no request met the hole meanwhile
    assert _lookups_for_a_request(pipeline, lookups, "s3") >= 2
