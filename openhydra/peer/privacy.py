"""Privacy on the peer wire: sealed steps and results, onion-carried routes (docs/security.md).

Wire convention (peer.proto ``Step.sealed`` / ``Result.sealed``): a private step travels as an outer
``Step`` holding only ``session_id``, ``seq``, ``onion`` (with the session's first message to each
hop) and ``sealed``; the plaintext of ``sealed`` is the serialized inner ``Step`` with everything
else (positions, tensor, sampling, deadline; the route and reply address unless onion routing is
on). Seals use crypto/session.py's keys with ``step = seq``, so the associated data binds session,
step (message number), hop and direction; ``seq`` must also match inside and out.

Under onion routing the inner step's ``route`` and ``reply_to`` are empty: a hop's span comes from
its onion layer's payload, its successor's address from the layer, the coordinator's address from the
last layer only. Failures then travel back up the chain (a hop cannot reach the coordinator): the
hop aborts its inbound stream with :data:`FAILURE_CODE`-style details from :func:`hop_failure`, each
predecessor relays it, and the coordinator maps the hop index to the address it chose.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from openhydra.crypto.errors import CryptoError, EvictedSession, MalformedMessage, StaleSession
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.onion import DEFAULT_ONION_SIZE, HopRef, RouteHop
from openhydra.crypto.records import decode_static_key
from openhydra.crypto.session import CoordinatorSession, PeerSession
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.session_admission import (
    PREFIX_SALT_BYTES,
    SessionAdmission,
    decode_payload,
    encode_payload,
    source_of,
)

if TYPE_CHECKING:
    from openhydra.runtime.prefix_cache import PrefixKey

log = logging.getLogger(__name__)
MAX_CRYPTO_SESSIONS = 4096
COORDINATOR_REF_ID = "coordinator"
_FAILURE = re.compile(r"^openhydra-hop-failure index=(-?\d+) code=(\d+) expected=(-?\d+): (.*)$", re.S)


@dataclass(frozen=True)
class ChainPrivacy:
    """The coordinator's privacy level for the steps it sends (from PrivacyConfig)."""

    encrypt: bool = False
    onion: bool = False
    onion_size_bytes: int = DEFAULT_ONION_SIZE
    dp_sigma: float = 0.0
    """> 0: every hop noises the hidden states it pushes (and the coordinator its embeddings)."""
    dp_clip: float = 300.0
    dp_clip_embeddings: float = 4.0
    prefix_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False, compare=False)
    """This coordinator's key for its hops' prefix salts (:func:`prefix_salt`): random per process."""

    @classmethod
    def from_config(cls, privacy: object | None) -> ChainPrivacy:
        if privacy is None:
            return cls()
        return cls(
            encrypt=bool(getattr(privacy, "encrypt_activations", False)),
            onion=bool(getattr(privacy, "onion", False)),
            onion_size_bytes=int(getattr(privacy, "onion_size_bytes", DEFAULT_ONION_SIZE)),
            dp_sigma=float(getattr(privacy, "dp_sigma", 0.0)),
            dp_clip=float(getattr(privacy, "dp_clip", 300.0)),
            dp_clip_embeddings=float(getattr(privacy, "dp_clip_embeddings", 4.0)),
        )

    @property
    def dp(self) -> bool:
        return self.encrypt and self.dp_sigma > 0


# ---- failures that travel back up the chain ----------------------------------------------------------


def hop_failure(index: int, code: grpc.StatusCode, message: str, expected: int = -1) -> str:
    """Abort details naming the failing hop by its index in the route (-1: the receiver of this stream)."""
    return f"openhydra-hop-failure index={index} code={code.value[0]} expected={expected}: {message}"


def parse_hop_failure(details: str) -> tuple[int, int, int, str] | None:
    """(index, code, expected, message) from :func:`hop_failure` details, or None."""
    match = _FAILURE.match(details or "")
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3]), match[4]


# ---- peer side -----------------------------------------------------------------------------------------


@dataclass
class HopState:
    """One session's crypto state at this hop."""

    session: PeerSession
    span: tuple[int, int] | None
    onion_forwarded: bool = False
    control_counter: int = 0  # last accepted control message counter (peer/session_auth.py)
    admitted_at: float = 0.0
    settlement_key: bytes | None = None  # derived on first use (peer/session_auth.py hop_settlement_key)
    prefix_salt: bytes = b""  # from this hop's onion layer: the namespace of the session's prefix blocks here

    def prefix_key(self, key: PrefixKey | None) -> PrefixKey | None:
        """The names this hop files the session's prompt blocks under: ``HMAC(salt, hash)`` with the salt the
        coordinator put in this hop's onion layer, which no other hop sees (:func:`prefix_salt`). A hop that saw a
        coordinator's block hashes can replay them in a session of its own, but cannot name this hop's blocks of
        that coordinator, so the junk it computes is never seeded into the coordinator's sessions. None (no prefix
        reuse) for an onion without a salt."""
        from openhydra.runtime.prefix_cache import PrefixKey

        if key is None or not self.prefix_salt:
            return None
        return PrefixKey(tuple(hmac.new(self.prefix_salt, h, hashlib.sha256).digest() for h in key.hashes), key.block)

    @property
    def index(self) -> int:
        return self.session.hop_index


def step_prefix_key(step: pb.Step, state: HopState | None) -> PrefixKey | None:
    """The names this hop files a session's prompt blocks under (runtime/prefix_cache.py): the block hashes of its
    first message, salted for this hop when the session is keyed (:meth:`HopState.prefix_key`: another hop that saw
    them cannot name this hop's blocks); as sent in a plaintext session (privacy=off trusts its coordinators).
    ValueError if malformed."""
    from openhydra.runtime.prefix_cache import PrefixKey

    if not step.prefix_hashes:
        return None
    key = PrefixKey(tuple(step.prefix_hashes), int(step.prefix_block))
    return key if state is None else state.prefix_key(key)


def encode_span(start: int, end: int, prefix_salt: bytes = b"") -> bytes:
    """A hop's onion payload: its span, the issue time and its prefix salt (peer/session_admission.py)."""
    return encode_payload(start, end, prefix_salt=prefix_salt)


def decode_span(payload: bytes) -> tuple[int, int] | None:
    return decode_payload(payload)[0]


def prefix_salt(secret: bytes, identity_key: bytes) -> bytes:
    """The prefix-cache salt a coordinator gives one hop (the same for all its sessions through that hop, different
    for every hop): the hop files the coordinator's prompt blocks under it (:meth:`HopState.prefix_key`)."""
    return hmac.new(secret, b"openhydra/prefix-salt/v1" + identity_key, hashlib.sha256).digest()[:PREFIX_SALT_BYTES]


ENDED_REMEMBERED = 4096
"""Session ids a peer remembers after dropping them, so a straggling step for one is told apart from a forgery."""


@dataclass
class PeerPrivacy:
    """A peer's keys, its sessions' hop state and its rejection counters."""

    static: StaticKeyPair
    require_encryption: bool = False
    rejections: Counter[str] = field(default_factory=Counter)
    _sessions: OrderedDict[str, HopState] = field(default_factory=OrderedDict)
    _ended: OrderedDict[str, None] = field(default_factory=OrderedDict)  # recently dropped session ids (bounded)
    admission: SessionAdmission = field(default_factory=lambda: SessionAdmission(MAX_CRYPTO_SESSIONS))

    def open_step(self, outer: pb.Step, source: str = "") -> tuple[pb.Step, HopState]:
        """The authenticated inner step, or a :class:`CryptoError` (counted; forward nothing).

        ``source``: the gRPC peer string of the stream (its IP address bounds what one source may hold)."""
        try:
            return self._open(outer, source_of(source))
        except CryptoError as exc:
            self.rejections[exc.reason] += 1
            raise

    def _open(self, outer: pb.Step, source: str) -> tuple[pb.Step, HopState]:
        sid = outer.session_id
        if not 1 <= len(sid.encode()) <= 255:
            raise MalformedMessage("session id must be 1..255 bytes")
        state = self._sessions.get(sid)
        new = False
        if outer.onion:
            if state is not None:
                raise MalformedMessage("a second onion for a session that already has one")
            session = PeerSession(bytes(outer.onion), self.static, sid)  # anyone can build one: proves nothing yet
            span, issued_ms, salt = decode_payload(session.layer.payload)
            self.admission.check(sid, issued_ms)  # single use per hop within the onion's lifetime
            state, new = HopState(session, span, prefix_salt=salt), True
        if state is None:
            if sid in self._ended:  # e.g. a step sent before a failover moved the session: not an attack
                raise StaleSession("sealed step for a session that ended here (closed, or moved by a failover)")
            if self.admission.was_keyed(sid):  # admitted under keys, then evicted to make room for others
                raise EvictedSession("sealed step for a session this hop evicted to admit others (its keys are gone)")
            raise MalformedMessage("sealed step for a session with no onion (its keys were never agreed)")
        opened = state.session.open_input(bytes(outer.sealed))
        inner = pb.Step()
        try:
            inner.ParseFromString(opened.plaintext)
        except Exception as exc:  # protobuf's DecodeError; authentic but ill-formed: a sender bug
            raise MalformedMessage("sealed step is not a Step") from exc
        if inner.session_id != sid or inner.seq != outer.seq or opened.step != outer.seq or inner.sealed:
            raise MalformedMessage("sealed step disagrees with its envelope (session, seq)")
        if new:  # authenticated: only now does the session take a place (peer/session_admission.py)
            self.admission.admit(sid, source, self._sessions)
            state.admitted_at = time.time()
            self._sessions[sid] = state
        self._sessions.move_to_end(sid)
        return inner, state

    def seal_step(self, state: HopState, inner: pb.Step) -> pb.Step:
        """The outer step for the successor (with the inner onion on the first one)."""
        outer = pb.Step(session_id=inner.session_id, seq=inner.seq,
                        sealed=state.session.seal_output(inner.seq, inner.SerializeToString()))
        if not state.onion_forwarded:
            outer.onion = state.session.inner_onion
            state.onion_forwarded = True
        return outer

    def seal_result(self, state: HopState, result: pb.Result) -> pb.Result:
        return pb.Result(session_id=result.session_id, seq=result.seq,
                         sealed=state.session.seal_output(result.seq, result.SerializeToString()))

    def state(self, session_id: str) -> HopState | None:
        return self._sessions.get(session_id)

    def drop(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self._ended[session_id] = None
            while len(self._ended) > ENDED_REMEMBERED:
                self._ended.popitem(last=False)

    def counts(self) -> dict[str, int]:
        return dict(self.rejections)


INBOUND_AHEAD = 2
"""Steps an onion stream's pump reads ahead of the hop (peer/privacy.py Inbound)."""


class Inbound:
    """The inbound steps of one Forward stream, plus (once :meth:`watch` is called, under onion)
    failures reported from downstream, which must end the stream even while it waits for a step.

    Watching starts a pump task that moves steps into a queue, so a failure can wake the reader
    with one queue item (a per-message task racing a future cost ~80 us per step per hop here).
    The queue holds at most :data:`INBOUND_AHEAD` steps: beyond them the pump waits, so gRPC's flow control
    holds back a sender that outpaces this hop (unbounded, a stranger whose reply address never read had one
    stream pile 4 GiB of padded steps into this peer in seconds)."""

    _WAKE = object()

    def __init__(self, messages) -> None:
        self._messages = messages.__aiter__()
        self._queue: asyncio.Queue | None = None
        self._pump: asyncio.Task | None = None
        self._ended = False
        self.failure: str | None = None

    def watch(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=INBOUND_AHEAD)
            self._pump = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for message in self._messages:
                await self._queue.put(message)
        except Exception as exc:  # the RPC was aborted or cancelled: the reader sees the end
            log.debug("inbound stream ended: %s", type(exc).__name__)
        finally:
            self._ended = True
            self._wake()

    def _wake(self) -> None:
        """Wake a reader waiting on an empty queue (a full one has items for it; it then sees the end or failure)."""
        if self._queue is not None and self._queue.empty():
            self._queue.put_nowait(self._WAKE)

    def report(self, details: str) -> None:
        """A downstream failure: the next :meth:`next` returns ``details`` (str) instead of a step."""
        if self.failure is None:
            self.failure = details
            self._wake()

    async def next(self) -> pb.Step | str | None:
        """The next step, None at the end of the stream, or the failure details (str)."""
        if self.failure is not None:
            return self.failure
        if self._queue is None:
            try:
                return await self._messages.__anext__()
            except StopAsyncIteration:
                return None
        while True:
            if self._ended and self._queue.empty():
                return self.failure
            item = await self._queue.get()
            if self.failure is not None:
                return self.failure
            if item is not self._WAKE:
                return item

    async def close(self) -> None:
        """Stop reading and close the stream's message generator. gRPC's receiver and its generator refer to each
        other, and a generator left suspended mid-stream (the call refused or ended early) keeps its last message
        (up to 64 MiB) until a full garbage collection; closed, it lets go now."""
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.wait([pump])
        closer = getattr(self._messages, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except Exception as exc:  # already running elsewhere, or the call is gone: nothing more to release
                log.debug("inbound stream close: %s", type(exc).__name__)


def with_onion_route(step: pb.Step, state: HopState | None, address: str, num_layers: int) -> pb.Step:
    """Under onion routing the route comes from this hop's layer: its span, its successor, and
    (last hop) the coordinator's address; the rest of the chain stays unknown to this peer."""
    if state is None or step.route:
        return step
    if state.span is None:
        raise ValueError("invalid step: no route and no span in the onion layer")
    start, end = state.span
    route = [pb.Hop(address=address, start=start, end=end)]
    successor = state.session.successor
    if successor is not None:
        route.append(pb.Hop(address=successor.address, start=end, end=num_layers))
    full = pb.Step()
    full.CopyFrom(step)
    full.route.extend(route)
    if successor is None and state.session.reply_to is not None:
        full.reply_to = state.session.reply_to.address
    return full


# ---- coordinator side ------------------------------------------------------------------------------------


def route_hops(route: Sequence[HopSpec], prefix_secret: bytes = b"") -> list[RouteHop]:
    """The onion route for ``route``; every hop needs its peer id and signed static key. With ``prefix_secret``
    each hop's layer carries its prefix salt (:func:`prefix_salt`)."""
    hops = []
    for hop in route:
        if not hop.static_key or not hop.peer_id:
            raise CryptoError(f"hop {hop.address} advertises no static key: cannot encrypt to it")
        static = decode_static_key(hop.static_key)
        salt = prefix_salt(prefix_secret, static.identity_key) if prefix_secret else b""
        hops.append(RouteHop(HopRef(peer_id=hop.peer_id, address=hop.address), static,
                             encode_span(hop.start, hop.end, salt)))
    return hops


@dataclass
class CoordinatorRoute:
    """One session's route as the coordinator encrypts it (a failover uses a new session id)."""

    route: tuple[HopSpec, ...]
    crypto: CoordinatorSession
    onion_sent: bool = False
    control_counter: int = 0  # last control message counter used (peer/session_auth.py)

    @classmethod
    def build(cls, session_id: str, route: Sequence[HopSpec], privacy: ChainPrivacy, reply_to: str) -> CoordinatorRoute:
        reply = HopRef(peer_id=COORDINATOR_REF_ID, address=reply_to) if privacy.onion else None
        crypto = CoordinatorSession(session_id, route_hops(route, privacy.prefix_secret),
                                    pad_to=privacy.onion_size_bytes, reply_to=reply)
        return cls(tuple(route), crypto)

    def seal_step(self, inner: pb.Step) -> pb.Step:
        outer = pb.Step(session_id=inner.session_id, seq=inner.seq,
                        sealed=self.crypto.seal_input(inner.seq, inner.SerializeToString()))
        if not self.onion_sent:
            outer.onion = self.crypto.onion
            self.onion_sent = True
        return outer

    def open_result(self, outer: pb.Result) -> pb.Result:
        opened = self.crypto.open_result(bytes(outer.sealed))
        inner = pb.Result()
        try:
            inner.ParseFromString(opened.plaintext)
        except Exception as exc:
            raise MalformedMessage("sealed result is not a Result") from exc
        if inner.session_id != outer.session_id or inner.seq != outer.seq or opened.step != outer.seq:
            raise MalformedMessage("sealed result disagrees with its envelope (session, seq)")
        return inner
