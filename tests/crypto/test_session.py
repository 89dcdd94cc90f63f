"""A 3-hop encrypted, onion-routed session end to end, with DP audits, using the session helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from openhydra.crypto.dp import DPAuditor, DPParams
from openhydra.crypto.errors import CryptoError, ReplayedMessage, TamperedMessage
from openhydra.crypto.session import CoordinatorSession, PeerSession

SESSION = "sess-e2e"


def to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(b: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.bfloat16).reshape(shape)


@pytest.fixture
def route(make_node: Callable[..., Any]) -> tuple[CoordinatorSession, list[PeerSession]]:
    nodes = [make_node(50051 + i) for i in range(3)]
    coord = CoordinatorSession(SESSION, [n.route_hop(f"span {i}".encode()) for i, n in enumerate(nodes)])
    peers, onion = [], coord.onion
    for node in nodes:
        peer = PeerSession(onion, node.static, SESSION)
        peers.append(peer)
        onion = peer.inner_onion
    return coord, peers


def test_decode_steps_flow_with_dp_and_audits(route: tuple[CoordinatorSession, list[PeerSession]]) -> None:
    coord, peers = route
    assert [p.hop_index for p in peers] == [0, 1, 2] and peers[2].is_last and peers[2].inner_onion == b""
    params = DPParams(sigma=0.001, clip=300.0)
    auditors = [DPAuditor(coord.audit_key(i), params, SESSION, i) for i in range(3)]
    shape = (1, 1, 576)
    for step in range(4):
        h = (torch.randn(shape) * 3).to(torch.bfloat16)
        msg = coord.seal_input(step, to_bytes(h))
        for peer in peers:
            got = peer.open_input(msg)
            assert got.step == step
            x = from_bytes(got.plaintext, shape) * 1.01  # "run the span"
            y, record = peer.noise(x, params, step)
            auditors[peer.hop_index].verify_record(record, step)
            auditors[peer.hop_index].verify_received(record, y)
            auditors[peer.hop_index].verify_against_input(record, x, step)
            msg = peer.seal_output(step, to_bytes(y))
        out = coord.open_result(msg)
        assert out.step == step and len(out.plaintext) == 576 * 2


def test_tampered_or_replayed_step_rejected_at_the_receiving_hop(
    route: tuple[CoordinatorSession, list[PeerSession]],
) -> None:
    coord, peers = route
    first = coord.seal_input(0, b"h0" * 100)
    out0 = peers[0].seal_output(0, peers[0].open_input(first).plaintext)
    bad = bytearray(out0)
    bad[-1] ^= 1
    with pytest.raises(TamperedMessage):
        peers[1].open_input(bytes(bad))
    assert peers[1].open_input(out0).step == 0  # the genuine message still goes through
    with pytest.raises(ReplayedMessage):
        peers[1].open_input(out0)
    with pytest.raises(CryptoError):
        peers[2].open_input(out0)  # sealed for hop 1, not hop 2
