"""Fixtures for crypto tests: nodes with an identity, a static X25519 key and its signed record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import SignedStaticKey, StaticKeyPair
from openhydra.crypto.onion import HopRef, RouteHop


@dataclass
class Node:
    identity: Identity
    static: StaticKeyPair
    signed: SignedStaticKey
    ref: HopRef

    def route_hop(self, payload: bytes = b"") -> RouteHop:
        return RouteHop(ref=self.ref, static_key=self.signed, payload=payload)


def new_node(port: int = 50051) -> Node:
    identity = Identity.generate()
    static = StaticKeyPair.generate()
    return Node(
        identity,
        static,
        static.signed_by(identity),
        HopRef(peer_id=identity.peer_id, address=f"127.0.0.1:{port}"),
    )


@pytest.fixture
def make_node() -> Callable[..., Node]:
    return new_node
