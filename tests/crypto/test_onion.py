"""Onion routing: each hop peels one layer, learns only its neighbours, and rejects any tampering."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openhydra.crypto.errors import CryptoError, InvalidStaticKey, MalformedMessage, TamperedMessage
from openhydra.crypto.onion import PeeledLayer, peel, wrap_route
from openhydra.crypto.seal import Direction, Opener, Sealer

SESSION = "session-0001"


def run_chain(
    onion: bytes, nodes: list[Any], tamper: Callable[[int, bytes], bytes] | None = None
) -> tuple[list[PeeledLayer], list[tuple[int, bytes]], int | None]:
    """Deliver the onion hop by hop as peers would. Returns the layers peeled, every forward made
    (sender hop, bytes), and the index of the hop that rejected (None if all accepted)."""
    peeled: list[PeeledLayer] = []
    forwarded: list[tuple[int, bytes]] = []
    incoming = onion
    for i, node in enumerate(nodes):
        if tamper is not None:
            incoming = tamper(i, incoming)
        try:
            layer = peel(incoming, node.static, SESSION)
        except CryptoError:
            return peeled, forwarded, i
        peeled.append(layer)
        if layer.successor is not None:
            forwarded.append((i, layer.inner))
            incoming = layer.inner
    return peeled, forwarded, None


@pytest.fixture
def three_nodes(make_node: Callable[..., Any]) -> list[Any]:
    return [make_node(50051 + i) for i in range(3)]


def test_each_hop_learns_only_its_neighbours(three_nodes: list[Any]) -> None:
    payloads = [b"layers 0-10", b"layers 10-20", b"layers 20-30"]
    route = wrap_route(SESSION, [n.route_hop(p) for n, p in zip(three_nodes, payloads, strict=True)])
    peeled, forwarded, rejected = run_chain(route.onion, three_nodes)
    assert rejected is None and len(forwarded) == 2
    a, b, c = three_nodes
    assert (peeled[0].predecessor, peeled[0].successor) == (None, b.ref)
    assert (peeled[1].predecessor, peeled[1].successor) == (a.ref, c.ref)
    assert (peeled[2].predecessor, peeled[2].successor) == (b.ref, None)
    assert [p.payload for p in peeled] == payloads
    assert [p.hop_index for p in peeled] == [0, 1, 2]
    assert peeled[2].inner == b""
    # no peer id or address is visible in what any hop receives or forwards
    for blob in [route.onion] + [f for _, f in forwarded]:
        for n in three_nodes:
            assert n.ref.peer_id.encode() not in blob and n.ref.address.encode() not in blob
    # keys chain up: each hop's egress key is its successor's ingress key, the last one returns
    assert peeled[0].egress_key == peeled[1].keys.ingress_key
    assert peeled[1].egress_key == peeled[2].keys.ingress_key
    assert peeled[2].egress_key == peeled[2].keys.return_key == route.return_key
    assert [p.keys for p in peeled] == route.hop_keys


def test_activations_flow_through_the_route(three_nodes: list[Any]) -> None:
    route = wrap_route(SESSION, [n.route_hop() for n in three_nodes])
    peeled, _, _ = run_chain(route.onion, three_nodes)
    hidden = bytes(range(256)) * 7
    msg = Sealer(route.first_ingress_key, SESSION, 0, Direction.FORWARD).seal(0, hidden)
    for i, layer in enumerate(peeled):
        got = Opener(layer.keys.ingress_key, SESSION, i, Direction.FORWARD).open(msg).plaintext
        hidden = bytes((x + 1) % 256 for x in got)  # "run the layers"
        last = layer.successor is None
        out = Sealer(layer.egress_key, SESSION, i if last else i + 1, Direction.RETURN if last else Direction.FORWARD)
        msg = out.seal(0, hidden)
    result = Opener(route.return_key, SESSION, 2, Direction.RETURN).open(msg).plaintext
    assert result == bytes((x + 3) % 256 for x in bytes(range(256)) * 7)


@pytest.mark.parametrize("hop", [0, 1, 2])
def test_bit_flip_in_each_layer_rejected_at_that_hop(three_nodes: list[Any], hop: int) -> None:
    route = wrap_route(SESSION, [n.route_hop(b"span") for n in three_nodes])
    honest, honest_forwards, _ = run_chain(route.onion, three_nodes)
    received = route.onion if hop == 0 else honest[hop - 1].inner
    rng = random.Random(hop)
    trials = 1500
    for _ in range(trials):
        bit = rng.randrange(len(received) * 8)

        def flip(i: int, blob: bytes, bit: int = bit) -> bytes:
            if i != hop:
                return blob
            bad = bytearray(blob)
            bad[bit // 8] ^= 1 << (bit % 8)
            return bytes(bad)

        peeled, forwarded, rejected = run_chain(route.onion, three_nodes, flip)
        assert rejected == hop, f"bit {bit} of hop {hop}'s layer was not rejected there"
        assert forwarded == honest_forwards[:hop]  # the tampering hop forwarded nothing
        assert len(peeled) == hop


def test_bit_flip_anywhere_in_full_onion_caught_at_first_hop(three_nodes: list[Any]) -> None:
    route = wrap_route(SESSION, [n.route_hop() for n in three_nodes])
    for bit in random.Random(7).sample(range(len(route.onion) * 8), 1000):
        bad = bytearray(route.onion)
        bad[bit // 8] ^= 1 << (bit % 8)
        _, forwarded, rejected = run_chain(bytes(bad), three_nodes)
        assert rejected == 0 and forwarded == []


def test_truncation_wrong_session_and_wrong_key_rejected(three_nodes: list[Any]) -> None:
    route = wrap_route(SESSION, [n.route_hop() for n in three_nodes])
    a = three_nodes[0]
    for cut in (0, 10, 48, len(route.onion) - 1):
        with pytest.raises((TamperedMessage, MalformedMessage)):
            peel(route.onion[:cut], a.static, SESSION)
    with pytest.raises(TamperedMessage):
        peel(route.onion, a.static, "another-session")
    with pytest.raises(TamperedMessage):
        peel(route.onion, three_nodes[1].static, SESSION)  # hop 1 cannot open hop 0's layer
    with pytest.raises(TamperedMessage):
        peel(route.onion + b"\0", a.static, SESSION)


def test_onion_size_hides_route_length(make_node: Callable[..., Any]) -> None:
    sizes = {len(wrap_route(SESSION, [make_node(i).route_hop() for i in range(n)]).onion) for n in (1, 2, 3, 5, 8)}
    assert sizes == {2048}
    with pytest.raises(ValueError, match="pad_to"):
        wrap_route(SESSION, [make_node().route_hop(b"x" * 3000)])


def test_route_with_bad_static_key_refused(three_nodes: list[Any], make_node: Callable[..., Any]) -> None:
    hops = [n.route_hop() for n in three_nodes]
    stranger = make_node()
    hops[1] = type(hops[1])(ref=hops[1].ref, static_key=stranger.signed)  # key of someone else
    with pytest.raises(InvalidStaticKey, match="expected"):
        wrap_route(SESSION, hops)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_hops=st.integers(1, 6),
    payloads=st.lists(st.binary(max_size=64), min_size=6, max_size=6),
    pad=st.sampled_from([None, 4096]),
    session=st.text(min_size=1, max_size=30),
)
def test_wrap_peel_round_trip_property(
    make_node: Callable[..., Any], n_hops: int, payloads: list[bytes], pad: int | None, session: str
) -> None:
    nodes = [make_node(60000 + i) for i in range(n_hops)]
    route = wrap_route(session, [n.route_hop(p) for n, p in zip(nodes, payloads, strict=False)], pad_to=pad)
    blob = route.onion
    for i, node in enumerate(nodes):
        layer = peel(blob, node.static, session)
        assert layer.hop_index == i and layer.payload == payloads[i]
        assert layer.predecessor == (nodes[i - 1].ref if i else None)
        assert layer.successor == (nodes[i + 1].ref if i + 1 < n_hops else None)
        assert layer.keys == route.hop_keys[i]
        blob = layer.inner
    assert blob == b""


def test_reply_address_reaches_only_the_last_hop(three_nodes: list[Any]) -> None:
    from openhydra.crypto.onion import HopRef

    coordinator = HopRef(peer_id="coordinator", address="127.0.0.1:8080")
    route = wrap_route(SESSION, [n.route_hop() for n in three_nodes], reply_to=coordinator)
    peeled, forwarded, rejected = run_chain(route.onion, three_nodes)
    assert rejected is None
    assert [p.reply_to for p in peeled] == [None, None, coordinator]
    assert peeled[2].successor is None and peeled[0].predecessor is None
    assert len(route.onion) == 2048
    for blob in [route.onion] + [f for _, f in forwarded]:
        assert b"127.0.0.1:8080" not in blob
