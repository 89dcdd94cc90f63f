"""A SwarmPipeline over real gRPC peers on loopback, in this process, for the coordinator-side swarm tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.server import PeerServer
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime

GREEDY = SamplingParams()


@contextmanager
def loopback_swarm(spans: list[tuple[int, int]], runtime: Callable[[int, int], ShardRuntime],
                   ) -> Iterator[tuple[SwarmPipeline, list[PeerServer]]]:
    """One peer per span (``runtime(start, end)`` builds its span), announced as peer0, peer1, ... of model "m"."""
    servers: list[PeerServer] = []
    records: list[PeerAnnouncement] = []
    for i, (a, b) in enumerate(spans):
        server = PeerServer(runtime(a, b))
        servers.append(server)
        records.append(PeerAnnouncement(peer_id=f"peer{i}", model_id="m", start=a, end=b, total_layers=spans[-1][1],
                                        grpc_address=server.start(), dtype="float32", announced_at=time.time(),
                                        ttl_s=3600.0))
    client = PeerChainClient([], tunables=ClientTunables(step_timeout_s=30.0))
    try:
        yield SwarmPipeline("m", spans[-1][1], lambda: list(records), client), servers
    finally:
        client.shutdown()
        for server in servers:
            server.stop()


def generate(pipeline: SwarmPipeline, session: str, prompt: list[int], n: int,
             before_step: Callable[[int], None] | None = None) -> list[int]:
    """``n`` greedy tokens of ``session``; ``before_step(k)`` runs before the step that produces token k (k >= 1)."""
    out = [pipeline.step(session, prompt, 0, GREEDY, 0)]
    while len(out) < n:
        if before_step is not None:
            before_step(len(out))
        out.append(pipeline.step(session, [out[-1]], len(prompt) + len(out) - 1, GREEDY, len(out)))
    pipeline.close(session)
    return out
