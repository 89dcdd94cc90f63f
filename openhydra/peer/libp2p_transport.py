"""The peer protocol over libp2p (hivemind's p2pd): reach peers that accept no inbound TCP (home NATs).

Every gRPC call to a peer (the Forward stream, the control RPCs, settlement) keeps its exact bytes: the
caller's gRPC channel dials a local *egress* port that this module opens per remote peer, each call becomes one
hivemind P2P stream of :class:`Frame` messages (method and metadata first, then one frame per serialized
message, then the status), and on the callee the *ingress* handler replays it into the peer's own gRPC server
on loopback. Sealing, onion layers, swarm tokens and settlement signatures are inside the payloads and
metadata, so they are checked exactly as over gRPC.

A peer reachable only this way announces the hop address ``<libp2p peer id>.p2p:1`` (:func:`p2p_address`): the
router, bans, onion routes and failover treat it like any ``host:port``; :func:`dial_target` (used by
``ChannelPool``) turns it into the egress port. libp2p finds the peer through addresses learned from discovery
records or, failing those, through a circuit on each relay this node knows (libp2p circuit relay v2 from p2pd:
we run no relay of our own). Which path a connection took (direct or relayed) is read back from p2pd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field

from openhydra.peer import outbound
from openhydra.peer.outbound import CHANNEL_OPTIONS, SERVER_OPTIONS
from openhydra.peer.proto import tunnel_pb2 as tpb

log = logging.getLogger(__name__)

HANDLER = "openhydra/peer/1"
READ_ONLY_METHODS = frozenset({"/openhydra.peer.v1.Peer/Info"})
"""gRPC methods that change nothing on the peer: sent again when a libp2p stream fails or closes before any answer
(up to READ_ONLY_ATTEMPTS sends in all), after a pause; the last one over a fresh connection to the peer."""
READ_ONLY_ATTEMPTS = 3
RETRY_PAUSE_S = 0.1
"""Before a read-only call is sent again: RETRY_PAUSE_S times the attempts made so far."""
P2P_SUFFIX = ".p2p"
_P2P_CODE, _CIRCUIT_CODE = 421, 290
Path = Literal["direct", "relayed", "none"]


def p2p_address(peer_id: str) -> str:
    """The hop address of a peer reached over libp2p (a valid host:port for every other module)."""
    return f"{peer_id}{P2P_SUFFIX}:1"


def p2p_peer_of(address: str) -> str | None:
    host = address.rpartition(":")[0]
    return host[: -len(P2P_SUFFIX)] if host.endswith(P2P_SUFFIX) else None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_maddr(text: str):
    """A multiaddr for p2pd. hivemind's bundled py-multiaddr writes ``/p2p/<id>`` as a CIDv1, which p2pd rejects
    ("length greater than remaining number of bytes in buffer"): write those components as the raw multihash."""
    import base58
    from hivemind.utils.multiaddr import Multiaddr

    head, *rest = text.split("/p2p/")
    data = bytearray(Multiaddr(head).to_bytes() if head else b"")
    for part in rest:
        peer, _, tail = part.partition("/")
        digest = base58.b58decode(peer)
        data += _varint(_P2P_CODE) + _varint(len(digest)) + digest
        if tail:
            data += Multiaddr("/" + tail).to_bytes()
    return Multiaddr(bytes(data))


def _is_circuit(maddr) -> bool:
    data = maddr.to_bytes() if hasattr(maddr, "to_bytes") else bytes(maddr)
    return _varint(_CIRCUIT_CODE) in data


class _ClosedMidCall(ConnectionError):
    """The libp2p stream ended without the call's end frame."""


class Libp2pSettings(BaseModel):
    """How this node joins libp2p (from ``peer.libp2p`` and ``discovery.relay`` in the node config)."""

    model_config = ConfigDict(extra="forbid")

    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    relays: list[str] = Field(default_factory=list)
    """Multiaddrs (with /p2p/<id>) of relays to reserve a slot on and to reach other NATed peers through."""
    relay_service: bool = True
    """Serve as a circuit relay for others (p2pd's relay v2 service, within the limits below)."""
    relay_max_circuits: int = Field(default=16, ge=1, le=1024)
    """Relayed connections open at once per peer (p2pd -relayMaxCircuits)."""
    relay_max_reservations: int = Field(default=128, ge=1, le=65536)
    """NATed peers holding a slot at once (p2pd -relayMaxReservations)."""
    relay_data_limit_mb: int = Field(default=4096, ge=1)
    """Bytes one relayed connection may carry each way before the relay resets it (p2pd -relayDataLimit)."""
    relay_time_limit_s: int = Field(default=1800, ge=1)
    """How long one relayed connection may live (p2pd -relayTimeLimit); a peer re-dials through a relay after."""
    behind_nat: bool = False
    """Tell libp2p it is not reachable (forceReachabilityPrivate): reserve relay slots at once instead of
    waiting for AutoNAT to conclude it."""
    reserve_timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    direct_probe_s: float = Field(default=1.0, gt=0)
    """``auto`` peers: how long a TCP connect to their gRPC address may take before libp2p is used instead."""


def relay_limit_flags(s: Libp2pSettings) -> dict[str, object]:
    """p2pd's relay v2 limits as its flags (they are not ``P2P.create`` arguments)."""
    return {"relayMaxCircuits": s.relay_max_circuits, "relayMaxReservations": s.relay_max_reservations,
            "relayDataLimit": s.relay_data_limit_mb << 20, "relayTimeLimit": f"{s.relay_time_limit_s}s"}


class Reachability(BaseModel):
    """What ``/v1/network/status``, the banner and the dashboard say about this node's reachability."""

    reachable: Literal["direct", "relayed", "unreachable"]
    reason: str
    transport: str
    libp2p_peer_id: str | None = None
    maddrs: list[str] = Field(default_factory=list)
    relayed_maddrs: list[str] = Field(default_factory=list)
    seconds_to_reachable: float | None = None


class Libp2pTransport:
    """One p2pd per node, on its own event loop thread; see the module docstring."""

    def __init__(self, settings: Libp2pSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="libp2p", daemon=True)
        self.p2p = None
        self.peer_id = ""
        self._known: dict[str, list[str]] = {}  # peer id -> multiaddrs learned from discovery
        self._fallback: dict[str, str] = {}  # host:port of a peer.transport=auto peer -> its libp2p id
        self._direct_ok: dict[str, bool] = {}  # host:port -> whether a TCP connection to it succeeded
        self._egress: dict[str, tuple[grpc.aio.Server, int]] = {}
        self._ingress_channel: grpc.aio.Channel | None = None
        self._lock = threading.Lock()
        self.calls = {"egress": 0, "ingress": 0, "failed": 0, "retried": 0, "reconnected": 0}
        self.started_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> str:
        """Start p2pd; returns this node's libp2p peer id (its hop address is ``p2p_address(peer_id)``)."""
        self.started_at = time.monotonic()
        self._thread.start()
        self._run(self._start(), timeout=60)
        return self.peer_id

    def serve(self, local_grpc: str) -> None:
        """Serve calls arriving over libp2p by replaying them into our own gRPC server at ``local_grpc``."""
        async def register() -> None:
            self._ingress_channel = grpc.aio.insecure_channel(local_grpc, options=CHANNEL_OPTIONS)
            await self.p2p.add_protobuf_handler(HANDLER, self._ingress, tpb.Frame, stream_input=True,
                                                stream_output=True)

        self._run(register(), timeout=30)

    async def _start(self) -> None:
        from hivemind.p2p import P2P

        s = self.settings
        relays = [encode_maddr(r) for r in s.relays]

        class _P2P(P2P):  # relayService is p2pd's, not a P2P.create argument
            @staticmethod
            def _make_process_args(*args, **kwargs):
                kwargs["relayService"] = s.relay_service
                if s.relay_service:
                    kwargs.update(relay_limit_flags(s))
                return P2P._make_process_args(*args, **kwargs)

        from hivemind.p2p import P2PDaemonError

        failures = 0
        while True:  # p2pd refuses to start when it reaches none of its bootstrap peers (the relays)
            try:
                self.p2p = await _P2P.create(
                    initial_peers=relays or None, host_maddrs=s.host_maddrs,
                    announce_maddrs=s.announce_maddrs or None, use_relay=True, use_auto_relay=bool(relays),
                    trusted_relays=relays or None, auto_nat=True, nat_port_map=False, use_ipfs=False,
                    dht_mode="client", idle_timeout=0, force_reachability="private" if s.behind_nat else None,
                    check_if_identity_free=False)
                break
            except P2PDaemonError as exc:
                if not relays:
                    raise
                failures += 1
                if failures >= 3:
                    log.warning("p2pd reaches none of the relays (%s); starting without them: unreachable", exc)
                    relays = []
                else:
                    log.warning("p2pd reaches none of the relays yet (%s); retrying in %d s", exc, failures)
                    await asyncio.sleep(failures)
        self.peer_id = self.p2p.peer_id.to_base58()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            for server, _ in self._egress.values():
                await server.stop(None)
            if self._ingress_channel is not None:
                await self._ingress_channel.close()
            if self.p2p is not None:
                await self.p2p.shutdown()

        with contextlib.suppress(Exception):
            self._run(shutdown(), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def _run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -- addresses and reachability ------------------------------------------------------------------------
    def maddrs(self, latest: bool = True) -> list[str]:
        async def get() -> list[str]:
            return [str(m) for m in await self.p2p.get_visible_maddrs(latest=latest)]

        return self._run(get(), timeout=10)

    def wait_reachable(self, timeout_s: float | None = None) -> Reachability:
        """How others reach this node. ``direct``: not behind a NAT (``behind_nat=false``; p2pd exposes no AutoNAT
        verdict to read). Behind a NAT: an explicit dial-back through each relay (a throwaway libp2p identity
        dials ``<relay>/p2p-circuit/p2p/<us>``) until one carries it (``relayed``, with the circuit addresses
        that worked) or the reservation timeout passes (``unreachable``)."""
        s = self.settings
        base = {"transport": "libp2p", "libp2p_peer_id": self.peer_id, "maddrs": self.maddrs()}
        if not s.behind_nat:
            return Reachability(reachable="direct", reason="not behind a NAT (peer.libp2p.behind_nat=false)",
                                seconds_to_reachable=round(time.monotonic() - self.started_at, 2), **base)
        if not s.relays:
            return Reachability(reachable="unreachable", reason="behind a NAT and no relay configured "
                                "(peer.libp2p.relays is empty)", **base)
        budget = timeout_s if timeout_s is not None else s.reserve_timeout_s
        relayed = self._run(self._dial_back(budget), timeout=budget + 30)
        if relayed:
            return Reachability(reachable="relayed", relayed_maddrs=relayed,
                                reason=f"dial-back through {len(relayed)} of {len(s.relays)} relay(s) reached us",
                                seconds_to_reachable=round(time.monotonic() - self.started_at, 2), **base)
        return Reachability(reachable="unreachable", **base,
                            reason=f"no relay carried a dial-back within {budget:.0f} s (no reservation; relays: "
                                   f"{', '.join(s.relays)})")

    async def _dial_back(self, budget_s: float) -> list[str]:
        from hivemind.p2p import P2P

        probe = await P2P.create(no_listen=True, use_relay=True, auto_nat=False, nat_port_map=False,
                                 dht_mode="client", idle_timeout=0, host_maddrs=None)
        deadline = time.monotonic() + budget_s
        try:
            while True:
                ok = []
                for relay in self.settings.relays:
                    try:
                        await asyncio.wait_for(probe._client.connect(self.p2p.peer_id,
                                                                     [encode_maddr(f"{relay}/p2p-circuit")]), 5.0)
                        ok.append(f"{relay}/p2p-circuit/p2p/{self.peer_id}")
                    except Exception:  # NO_RESERVATION (yet) or the relay is down
                        continue
                if ok or time.monotonic() > deadline:
                    return ok
                await asyncio.sleep(0.5)
        finally:
            await probe.shutdown()

    def learn(self, peer_id: str, maddrs: Sequence[str]) -> None:
        """Addresses of a peer as its discovery record announced them."""
        if maddrs:
            with self._lock:
                self._known[peer_id] = list(maddrs)[:16]

    def learn_fallback(self, address: str, maddrs: Sequence[str]) -> None:
        """A peer announced a gRPC ``address`` and libp2p addresses (``peer.transport=auto``, reachable directly):
        dial it directly, over libp2p when a TCP connection to ``address`` fails (a firewall, a wrong address)."""
        peer = next((m.rsplit("/p2p/", 1)[1] for m in maddrs if "/p2p/" in m and "/p2p-circuit" not in m), None)
        if peer is not None:
            self.learn(peer, maddrs)
            with self._lock:
                self._fallback[address] = peer

    def _direct_reachable(self, address: str) -> bool:
        import socket

        from openhydra.discovery.records import parse_host_port

        with self._lock:
            if address in self._direct_ok:
                return self._direct_ok[address]
        try:
            with socket.create_connection(parse_host_port(address), timeout=self.settings.direct_probe_s):
                ok = True
        except OSError:
            ok = False
        with self._lock:
            self._direct_ok[address] = ok
        if not ok:
            log.info("%s does not accept TCP: reaching it over libp2p (%s)", address, self._fallback[address])
        return ok

    def paths(self) -> dict[str, Path]:
        """Each connected libp2p peer and whether its connection is direct or through a relay circuit."""
        async def get() -> dict[str, Path]:
            out: dict[str, Path] = {}
            for info in await self.p2p.list_peers():
                # a direct connection, once there is one (DCUtR, or a later direct dial), carries new streams
                direct = any(not _is_circuit(a) for a in info.addrs)
                out[info.peer_id.to_base58()] = "direct" if direct else "relayed"
            return out

        try:
            return self._run(get(), timeout=10)
        except Exception as exc:  # p2pd gone or stuck: the status page must still answer
            log.warning("cannot list libp2p connections: %s", exc)
            return {}

    # -- egress: our gRPC calls to a libp2p peer ----------------------------------------------------------
    def dial_target(self, address: str) -> str:
        """The loopback port that carries gRPC calls to ``address``'s peer over libp2p (opened on first use)."""
        peer = p2p_peer_of(address)
        if peer is None and address in self._fallback and not self._direct_reachable(address):
            peer = self._fallback[address]
        if peer is None:
            return address
        with self._lock:
            if peer in self._egress:
                return f"127.0.0.1:{self._egress[peer][1]}"
        server, port = self._run(self._open_egress(peer), timeout=10)
        with self._lock:
            if peer in self._egress:  # another thread won: keep one
                self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(server.stop(None)))
                return f"127.0.0.1:{self._egress[peer][1]}"
            self._egress[peer] = (server, port)
        return f"127.0.0.1:{port}"

    async def _open_egress(self, peer: str) -> tuple[grpc.aio.Server, int]:
        transport = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                async def call(requests, context):
                    async for raw in transport._egress_call(peer, details.method, requests, context):
                        yield raw

                return grpc.stream_stream_rpc_method_handler(call)

        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((Handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    async def _connect(self, peer: str) -> None:
        from hivemind.p2p import PeerID

        pid = PeerID.from_base58(peer)
        if any(info.peer_id == pid for info in await self.p2p.list_peers()):
            return
        with self._lock:
            known = list(self._known.get(peer, []))
        candidates = [m for m in known if "/p2p-circuit" not in m]  # direct first, then relayed
        candidates += [m for m in known if "/p2p-circuit" in m]
        candidates += [f"{relay}/p2p-circuit" for relay in self.settings.relays]
        errors = []
        for maddr in candidates:
            maddr = maddr[: -len(f"/p2p/{peer}")] if maddr.endswith(f"/p2p/{peer}") else maddr
            try:
                await asyncio.wait_for(self.p2p._client.connect(pid, [encode_maddr(maddr)]),
                                       self.settings.connect_timeout_s)
                return
            except Exception as exc:  # every failed address is reported together
                errors.append(f"{maddr}: {exc}")
        raise ConnectionError(f"cannot reach libp2p peer {peer}: " + ("; ".join(errors) or "no known address"))

    async def _reconnect(self, peer: str) -> None:
        """Close our connection to ``peer`` so the next call dials a fresh one: streams on it failed before any
        answer, twice (CI once saw three sends in a row break with BrokenPipeError on one connection). Other calls
        on that connection fail with it (they are likely broken too). Kept when we know no address to dial again."""
        from hivemind.p2p import PeerID

        with self._lock:
            known = bool(self._known.get(peer)) or bool(self.settings.relays)
        if not known:
            return
        try:
            await asyncio.wait_for(self.p2p._client.disconnect(PeerID.from_base58(peer)),
                                   self.settings.connect_timeout_s)
        except Exception as exc:  # the next send reports what is wrong
            log.info("libp2p: closing the connection to %s failed (%s: %s)", peer, type(exc).__name__, exc)
            return
        self.calls["reconnected"] += 1

    async def _egress_call(self, peer: str, method: str, requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        from hivemind.p2p import PeerID

        self.calls["egress"] += 1
        metadata = [tpb.Metadata(key=k, value=v if isinstance(v, bytes) else v.encode())
                    for k, v in context.invocation_metadata() or () if not k.startswith((":", "grpc-", "user-agent"))]
        remaining = context.time_remaining()
        # A read-only call whose stream failed or closed before any answer is sent again on a fresh stream (under
        # load CI saw BrokenPipeError, and a stream closed before its answer); its one request is kept for that.
        retry_safe = method in READ_ONLY_METHODS
        kept: list[bytes] | None = [raw async for raw in requests] if retry_safe else None

        async def frames() -> AsyncIterator[tpb.Frame]:
            yield tpb.Frame(method=method, metadata=metadata, timeout_s=remaining or 0.0)
            with contextlib.suppress(grpc.aio.AbortError):  # we aborted the call: its request stream ends here
                if kept is not None:
                    for raw in kept:
                        yield tpb.Frame(payload=raw, has_payload=True)
                else:
                    async for raw in requests:
                        yield tpb.Frame(payload=raw, has_payload=True)
            yield tpb.Frame(end=True)

        attempts = READ_ONLY_ATTEMPTS if retry_safe else 1
        for attempt in range(1, attempts + 1):
            answered = False
            try:
                await self._connect(peer)
                responses = await self.p2p.iterate_protobuf_handler(PeerID.from_base58(peer), HANDLER, frames(),
                                                                    tpb.Frame)
                async for frame in responses:
                    answered = True
                    if frame.has_payload:
                        yield frame.payload
                    if frame.end:
                        if frame.code:
                            await context.abort(grpc.StatusCode(_code(frame.code)), frame.details)
                        return
                raise _ClosedMidCall(f"libp2p stream to {peer} closed mid-call")
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # any libp2p failure (or an early close) is the hop being unavailable
                if not answered and attempt < attempts:
                    log.info("libp2p %s to %s failed before an answer (%s: %s): sending it once more", method,
                             peer, type(exc).__name__, exc)
                    self.calls["retried"] += 1
                    await asyncio.sleep(RETRY_PAUSE_S * attempt)
                    if attempt == attempts - 1:
                        await self._reconnect(peer)
                    continue
                self.calls["failed"] += 1
                why = str(exc) if isinstance(exc, _ClosedMidCall) else f"libp2p {peer}: {type(exc).__name__}: {exc}"
                await context.abort(grpc.StatusCode.UNAVAILABLE, why)

    # -- ingress: calls arriving over libp2p, replayed into our gRPC server --------------------------------
    async def _ingress(self, requests: AsyncIterator[tpb.Frame], _context) -> AsyncIterator[tpb.Frame]:
        self.calls["ingress"] += 1
        first = await anext(requests)
        metadata = tuple((m.key, m.value if m.key.endswith("-bin") else m.value.decode()) for m in first.metadata)
        call = self._ingress_channel.stream_stream(first.method)(
            metadata=metadata or None, timeout=first.timeout_s or None)

        async def pump() -> None:
            async for frame in requests:
                if frame.has_payload:
                    await call.write(frame.payload)
                if frame.end:
                    break
            await call.done_writing()

        pumping = asyncio.ensure_future(pump())
        code, details = grpc.StatusCode.OK, ""
        try:
            async for raw in call:
                yield tpb.Frame(payload=raw, has_payload=True)
            code, details = await call.code(), await call.details()
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        finally:
            pumping.cancel()
        yield tpb.Frame(end=True, code=code.value[0], details=details or "")


def _code(value: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


_ACTIVE: Libp2pTransport | None = None


def install(transport: Libp2pTransport | None) -> None:
    """Make ``transport`` the one every ChannelPool of this process dials ``*.p2p`` addresses through."""
    global _ACTIVE
    _ACTIVE = transport
    outbound.dial_resolver = dial_target if transport is not None else None


def dial_target(address: str) -> str:
    """What a gRPC channel to ``address`` dials: the address itself, or the egress port of a libp2p peer."""
    if _ACTIVE is None:
        return address
    return _ACTIVE.dial_target(address)
