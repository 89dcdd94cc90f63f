"""A scripted stand-in for PeerChainClient, for SwarmPipeline tests that need no real peers."""

from __future__ import annotations

import time

import grpc

from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.client import StepResult
from openhydra.peer.errors import HopError


def announcement(peer: str, start: int, end: int, announced_at: float | None = None) -> PeerAnnouncement:
    """A record of a 4-layer model ``m``; each peer gets its own loopback address."""
    return PeerAnnouncement(peer_id=peer, model_id="m", start=start, end=end, total_layers=4,
                            grpc_address=f"127.0.0.1:{1000 + ord(peer[0])}",
                            announced_at=time.time() if announced_at is None else announced_at, ttl_s=300.0)


class ScriptedClient:
    """Answers every step with token 7; hops listed in ``dead`` fail with their status (UNAVAILABLE: refused,
    DEADLINE_EXCEEDED: timed out). ``routes`` records every route stepped through."""

    def __init__(self) -> None:
        self.dead: dict[str, grpc.StatusCode] = {}
        self.messages: dict[str, str] = {}  # the failure's text per hop (default "down")
        self.routes: list[list[str]] = []

    def step_result(self, session_id, tokens, start, sampling, step, route, **_):
        self.routes.append([h.address for h in route])
        for hop in route:
            if hop.address in self.dead:
                raise HopError(hop.address, self.dead[hop.address], self.messages.get(hop.address, "down"))
        return StepResult(token=7, last_hop=route[-1].address)

    def close(self, session_id, route=None) -> None:
        pass
