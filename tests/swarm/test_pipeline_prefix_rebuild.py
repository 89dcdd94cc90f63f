"""The coordinator's side of a failover rebuild after a prefix-cache hit, through SwarmPipeline over real gRPC peers
on loopback (in this process): a session whose first step skipped cached prompt blocks loses its middle hop; the
pipeline splits the first step into the skipped blocks and the rest, the replacement (which never saw the blocks)
computes both, nobody replays in full, and the tokens equal those of the cold session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from openhydra.metrics import METRICS
from openhydra.peer.server import PeerServer
from openhydra.router.prefix_plan import PrefixPlanner
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.prefix_cache import PrefixCache
from openhydra.runtime.shard import ShardRuntime
from tests.swarm.loopback import generate, loopback_swarm

SPANS = [(0, 3), (3, 5), (3, 5), (5, 8)]  # a spare for the middle span
BLOCK = 4
PROMPT = [1, 504, 3456, 28, 17, 906, 2201, 11, 310, 4077, 19, 88, 73, 2090]  # 14 tokens: 3 full blocks


@pytest.fixture
def swarm(tiny_model_dirs) -> Iterator[tuple[SwarmPipeline, list[PeerServer]]]:
    def runtime(a: int, b: int) -> ShardRuntime:
        built = ShardRuntime(tiny_model_dirs["llama"], a, b)
        built.prefix_cache = PrefixCache(built.layer_types, 16 << 20, BLOCK)
        return built

    with loopback_swarm(SPANS, runtime) as (pipeline, servers):
        pipeline.prefix = PrefixPlanner(block=BLOCK)
        yield pipeline, servers


def _generate(pipeline: SwarmPipeline, session: str, n: int, on_token=None) -> list[int]:
    return generate(pipeline, session, PROMPT, n, on_token)


@pytest.mark.parametrize("prefix_fits", [True, False], ids=["prefix in one message", "prefix over the cap"])
def test_failover_after_a_prefix_hit_rebuilds_only_the_replacement_and_output_is_unchanged(
        swarm, prefix_fits, monkeypatch) -> None:
    """And when the skipped blocks' activations would not fit one message (peer/outbound.py caps every message; a
    long cached prefix of a big model can exceed it), the hop refuses to send them and the coordinator replays the
    session in full: the same tokens, one fallback."""
    pipeline, servers = swarm
    if not prefix_fits:
        monkeypatch.setattr("openhydra.peer.rebuild_service.MAX_TENSOR_MESSAGE_BYTES", 1)
    cold = _generate(pipeline, "cold", 16)  # fills the prefix caches of the chain it ran through
    rebuilds, fallbacks = METRICS.rebuilds._value.get(), METRICS.rebuild_fallbacks._value.get()
    killed: list[PeerServer] = []

    def kill_middle(produced: int) -> None:
        if produced != 6:
            return
        session = pipeline._sessions["warm"]
        assert session.first_sent is not None and session.first_sent[0] == 3 * BLOCK  # the prefix hit happened
        middle = session.chain.hops[1].peer.grpc_address
        victim = next(s for s in servers if s.address == middle)
        assert victim.runtime.prefix_cache.available(session.first_sent[1]) == 3 * BLOCK
        victim.stop()
        killed.append(victim)

    warm = _generate(pipeline, "warm", 16, kill_middle)
    assert killed, "the middle hop was never stopped"
    assert warm == cold
    assert pipeline.failovers == 1
    if prefix_fits:
        assert METRICS.rebuilds._value.get() - rebuilds == 1  # only the replacement computed the history
        assert METRICS.rebuild_fallbacks._value.get() - fallbacks == 0  # no full replay
    else:
        assert METRICS.rebuild_fallbacks._value.get() - fallbacks == 1  # the oversized prefix: a full replay
    assert pipeline.replay_mismatches == 0
