"""A hop whose runtime evicted the coordinator's session (its store keeps serving.max_sessions, the least recently
used go) answers the next step with a position mismatch at 0. That is load, not a fault: the coordinator replays the
session on the same chain, bans nobody, and the tokens are those of a session never evicted. A hop that keeps
saying so (overloaded, or lying so that the coordinator replays every step) is banned and failed over after
``EVICTIONS_REPLAYED`` replays of one session. SwarmPipeline over real gRPC peers on loopback, in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from openhydra.metrics import METRICS
from openhydra.peer.server import PeerServer
from openhydra.router.swarm import EVICTIONS_REPLAYED, SwarmPipeline
from openhydra.runtime.shard import ShardRuntime
from tests.swarm.loopback import generate, loopback_swarm

SPANS = [(0, 4), (4, 8), (4, 8)]  # a spare for the second span
KEEP = 3
PROMPT = [1, 504, 3456, 28, 17, 906, 2201, 11, 310, 4077, 19, 88, 73, 2090]


@pytest.fixture
def swarm(tiny_model_dirs) -> Iterator[tuple[SwarmPipeline, list[PeerServer]]]:
    with loopback_swarm(SPANS, lambda a, b: ShardRuntime(tiny_model_dirs["llama"], a, b, max_sessions=KEEP)) as built:
        yield built


def _evict(server: PeerServer, tag: str) -> None:
    """Other coordinators' sessions arrive on ``server``, one more than its runtime keeps: ours is dropped."""
    for j in range(KEEP + 1):
        server.runtime._sessions.acquire(f"other-{tag}-{j}")


def _generate(pipeline: SwarmPipeline, session: str, n: int, before_step=None) -> list[int]:
    return generate(pipeline, session, PROMPT, n, before_step)


def _hop_server(pipeline: SwarmPipeline, servers: list[PeerServer], session: str, hop: int) -> PeerServer:
    address = pipeline._sessions[session].chain.hops[hop].peer.grpc_address
    return next(s for s in servers if s.address == address)


def test_an_evicted_session_is_replayed_on_the_same_peers_without_a_ban(swarm) -> None:
    pipeline, servers = swarm
    cold = _generate(pipeline, "cold", 14)
    bans, replays = METRICS.bans._value.get(), METRICS.replays._value.get()
    chain: list[str] = []
    evicted_on: list[str] = []

    def evict(produced: int) -> None:
        if produced == 2:
            chain.extend(h.peer.grpc_address for h in pipeline._sessions["warm"].chain.hops)
        if produced in (3, 9):  # on the first hop, then on the second
            server = _hop_server(pipeline, servers, "warm", 0 if produced == 3 else 1)
            _evict(server, str(produced))
            evicted_on.append(server.address)

    assert _generate(pipeline, "warm", 14, evict) == cold
    assert METRICS.bans._value.get() - bans == 0 and pipeline.failovers == 0
    assert METRICS.replays._value.get() - replays == 2
    assert evicted_on == chain  # the session stayed on its chain throughout


def test_a_hop_that_evicts_every_step_is_failed_over_after_a_few_replays(swarm) -> None:
    pipeline, servers = swarm
    cold = _generate(pipeline, "cold", 12)
    bans = METRICS.bans._value.get()
    victim: list[PeerServer] = []

    def evict_every_step(produced: int) -> None:
        server = _hop_server(pipeline, servers, "warm", 1)
        if not victim:
            victim.append(server)
        if server is victim[0]:  # until the session leaves it
            _evict(server, str(produced))

    assert _generate(pipeline, "warm", 12, evict_every_step) == cold
    assert pipeline.failovers == 1 and METRICS.bans._value.get() - bans == 1
    assert pipeline._sessions.get("warm") is None  # closed
    ban_reasons = " ".join(pipeline._ban_reasons.values())
    assert victim[0].address in ban_reasons and "FAILED_PRECONDITION" in ban_reasons
    assert EVICTIONS_REPLAYED == 2
