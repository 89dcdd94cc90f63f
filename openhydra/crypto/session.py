"""Both ends of an encrypted, onion-routed pipeline session, ready for the gRPC layer to use.

Ties together :mod:`openhydra.crypto.onion` and :mod:`openhydra.crypto.seal` with the conventions of
docs/security.md ("How the pieces fit one request"), so callers do not pick hop indexes, directions
or keys by hand:

- the coordinator seals step inputs for hop 0 with hop 0's ingress key and opens the last hop's
  answer with the last hop's return key;
- hop *i* opens with its ingress key (``hop = i``, forward) and seals its output with the egress key
  from its layer: for hop *i + 1* (``hop = i + 1``, forward), or for the coordinator when it is last
  (``hop = i``, return).

Every failure is a :class:`~openhydra.crypto.errors.CryptoError`; the caller forwards nothing, counts
``exc.reason`` and fails the stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openhydra.crypto.dp import DPParams, DPRecord, apply_dp
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.onion import DEFAULT_ONION_SIZE, HopRef, PeeledLayer, RouteHop, peel, wrap_route
from openhydra.crypto.seal import Direction, OpenedMessage, Opener, Sealer


class CoordinatorSession:
    """The coordinator's side of one route of one session (a failover makes a new one)."""

    def __init__(
        self,
        session_id: str,
        hops: Sequence[RouteHop],
        pad_to: int | None = DEFAULT_ONION_SIZE,
        reply_to: HopRef | None = None,
    ) -> None:
        self.session_id = session_id
        self.route = wrap_route(session_id, hops, pad_to=pad_to, reply_to=reply_to)
        self.last_hop = len(hops) - 1
        self._to_first = Sealer(self.route.first_ingress_key, session_id, 0, Direction.FORWARD)
        self._from_last = Opener(self.route.return_key, session_id, self.last_hop, Direction.RETURN)

    @property
    def onion(self) -> bytes:
        """Send to the first hop with the session's first message."""
        return self.route.onion

    def seal_input(self, step: int, payload: bytes) -> bytes:
        return self._to_first.seal(step, payload)

    def open_result(self, message: bytes) -> OpenedMessage:
        return self._from_last.open(message)

    def audit_key(self, hop_index: int) -> bytes:
        return self.route.hop_keys[hop_index].audit_key


class PeerSession:
    """One hop's side: built from the onion it received, once per session."""

    def __init__(self, onion: bytes, static: StaticKeyPair, session_id: str) -> None:
        self.session_id = session_id
        self.layer: PeeledLayer = peel(onion, static, session_id)
        i = self.layer.hop_index
        self._in = Opener(self.layer.keys.ingress_key, session_id, i, Direction.FORWARD)
        if self.is_last:
            self._out = Sealer(self.layer.egress_key, session_id, i, Direction.RETURN)
        else:
            self._out = Sealer(self.layer.egress_key, session_id, i + 1, Direction.FORWARD)

    @property
    def hop_index(self) -> int:
        return self.layer.hop_index

    @property
    def is_last(self) -> bool:
        return self.layer.successor is None

    @property
    def successor(self) -> HopRef | None:
        """Where to send output; None: back to the coordinator."""
        return self.layer.successor

    @property
    def reply_to(self) -> HopRef | None:
        """Last hop: the coordinator's address for results, from the onion (not the clear Step)."""
        return self.layer.reply_to

    @property
    def inner_onion(self) -> bytes:
        """Forward this to the successor with the first message (empty for the last hop)."""
        return self.layer.inner

    def open_input(self, message: bytes) -> OpenedMessage:
        return self._in.open(message)

    def seal_output(self, step: int, payload: bytes) -> bytes:
        return self._out.seal(step, payload)

    def noise(self, hidden: torch.Tensor, params: DPParams, step: int) -> tuple[torch.Tensor, DPRecord]:
        """DP noise on this hop's output (h: [..., D]) with its audit record."""
        return apply_dp(hidden, params, self.layer.keys.audit_key, self.session_id, self.hop_index, step)
