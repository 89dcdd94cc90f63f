"""Speculative decoding through SwarmPipeline over real gRPC peers on loopback (in this process): greedy output
equals plain greedy, a peer killed mid-generation is replaced and the replayed history holds only accepted
tokens (output unchanged), and a recurrent model whose hops refuse to truncate is rebuilt by replay."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.server import PeerServer
from openhydra.router.speculative import Decoder, SpeculativeConfig, Speculator, build_drafter
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime

GREEDY = SamplingParams()
PROMPT = [1, 504, 3456, 28, 17, 906, 2201, 11, 310, 4077, 19, 88]


class Swarm:
    def __init__(self, model_dir, spans: list[tuple[int, int]]) -> None:
        self.servers: list[PeerServer] = []
        self.records: list[PeerAnnouncement] = []
        for i, (a, b) in enumerate(spans):
            server = PeerServer(ShardRuntime(model_dir, a, b))
            self.servers.append(server)
            self.records.append(PeerAnnouncement(peer_id=f"peer{i}", model_id="m", start=a, end=b,
                                                 total_layers=spans[-1][1], grpc_address=server.start(),
                                                 dtype="float32", announced_at=time.time(), ttl_s=3600.0))
        self.client = PeerChainClient([], tunables=ClientTunables(step_timeout_s=30.0))
        self.pipeline = SwarmPipeline("m", spans[-1][1], lambda: list(self.records), self.client)

    def close(self) -> None:
        self.client.shutdown()
        for server in self.servers:
            server.stop()


def _generate(pipeline, n: int, speculator=None, session="s", on_tokens=None) -> tuple[list[int], Decoder]:
    decoder = Decoder(pipeline, session, PROMPT, GREEDY, n, speculator)
    out: list[int] = []
    while len(out) < n:
        out += decoder.next_tokens()
        if on_tokens is not None:
            on_tokens(len(out))
    pipeline.close(session)
    decoder.close()
    return out, decoder


def _speculator(draft_dir, k: int = 4) -> Speculator:
    config = SpeculativeConfig(mode="draft", k=k, min_acceptance=0.0)
    return Speculator(config, build_drafter(config, ShardRuntime(draft_dir), 49152))


@pytest.fixture(scope="module")
def llama_swarm(tiny_model_dirs) -> Iterator[Swarm]:
    swarm = Swarm(tiny_model_dirs["llama"], [(0, 3), (3, 5), (3, 5), (5, 8)])  # a spare for the middle span
    yield swarm
    swarm.close()


def test_swarm_greedy_speculative_equals_plain(llama_swarm, tiny_model_dirs):
    expected, _ = _generate(llama_swarm.pipeline, 40, session="plain")
    speculator = _speculator(tiny_model_dirs["qwen3"])
    got, decoder = _generate(llama_swarm.pipeline, 40, speculator, session="spec")
    assert got == expected
    assert 0 < decoder.accepted < decoder.drafted  # verified and truncated on the peers
    assert llama_swarm.pipeline.truncations > 0


def test_failover_mid_speculation_replays_only_accepted_tokens(llama_swarm, tiny_model_dirs):
    pipeline = llama_swarm.pipeline
    expected, _ = _generate(pipeline, 40, session="plain2")
    killed: list[str] = []

    def kill_middle(produced: int) -> None:
        if produced >= 15 and not killed:
            chain = pipeline.status()["sessions"]["spec2"]
            middle = next(p for p in chain if p in ("peer1", "peer2"))
            llama_swarm.servers[int(middle[-1])].stop()
            killed.append(middle)

    failovers = pipeline.failovers
    got, decoder = _generate(pipeline, 40, _speculator(tiny_model_dirs["qwen3"]), session="spec2",
                             on_tokens=kill_middle)
    assert killed and pipeline.failovers > failovers
    assert got == expected
    assert decoder.accepted < decoder.drafted
    assert pipeline.replay_mismatches == 0


def test_recurrent_hops_refuse_truncation_and_replay_keeps_output_exact(tiny_model_dirs):
    swarm = Swarm(tiny_model_dirs["qwen3_5"], [(0, 2), (2, 4), (4, 8)])
    try:
        expected, _ = _generate(swarm.pipeline, 16, session="plain")
        assert swarm.pipeline.supports_truncate  # not told: it learns from refused Truncates
        speculator = _speculator(tiny_model_dirs["llama"], k=3)  # a different model: rejections
        got, _ = _generate(swarm.pipeline, 16, speculator, session="spec")
        assert got == expected
        assert swarm.pipeline.supports_truncate is False
        assert speculator.stats.verify_steps <= 3  # three refusals, then plain decoding for the rest
    finally:
        swarm.close()
