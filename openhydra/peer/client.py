"""The coordinator's side of the peer protocol: send steps to the first peer, receive Results directly.

``PeerChainClient`` hosts a small ``Coordinator.Deliver`` server (the ``reply_to`` address every
step carries), keeps one stream per session to the route's first peer, and turns each step into a
future resolved by the Result the last peer pushes back: N + 1 one-way hops per token for N peers (N when the first
peer is this very process's, on the loop the client shares with it: peer/local_stream.py).
Any failure surfaces as :class:`HopError` naming the hop to fail over. It implements the router's
``Pipeline`` protocol (``step``/``close``); failover and replay belong to the router.

With ``privacy`` on, the client embeds token ids itself (``embedder``), seals every step for the
first hop, sends each session's onion with its first step, and opens the sealed Result (see
peer/privacy.py); a result that fails to open is a :class:`HopError` naming the last hop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from openhydra.crypto.errors import CryptoError
from openhydra.peer.client_control import ControlCalls
from openhydra.peer.client_privacy import ClientPrivacy
from openhydra.peer.codec import codec_from_name
from openhydra.peer.embedding import Embedder
from openhydra.peer.errors import HopError, status_code
from openhydra.peer.head import Head
from openhydra.peer.liveness import MAX_WAIT_STEPS, Liveness
from openhydra.peer.local_stream import LocalStream
from openhydra.peer.messages import HopSpec, StepResult
from openhydra.peer.outbound import (
    MAX_MESSAGE_BYTES,
    SERVER_OPTIONS,
    STREAM_LIFETIME_S,
    ChannelPool,
    OutboundStream,
    StreamBroken,
)
from openhydra.peer.privacy import ChainPrivacy, CoordinatorRoute, parse_hop_failure
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.rebuild_client import RebuildClient
from openhydra.peer.refusals import releasing
from openhydra.peer.session_auth import SettlementKeys
from openhydra.peer.wire import decode_tensor
from openhydra.router import abandon
from openhydra.runtime.prefix_cache import PrefixKey
from openhydra.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)
KeyLookup = Callable[[str, str], tuple[str, str | None] | None]
"""(address, routed peer id or "") -> (peer id, signed static key) of that peer's record at that address, for hops
given without keys."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@dataclass(frozen=True)
class ClientTunables:
    step_timeout_s: float = 30.0
    """How long a hop may hold a step in flight without serving any step before it is blamed as stuck. Liveness is
    judged by progress (see ``decode_timeout_s``), so a long prefill or a busy chain is never cut by one fixed
    deadline."""
    decode_timeout_s: float | None = None
    """Patience before the coordinator asks the chain whether it is making progress: this floor, or
    ``decode_timeout_factor`` x the median of recent decode latencies, whichever is larger (capped at
    ``step_timeout_s``). A probe (Info to every hop at once, ``probe_timeout_s``) is sent ``probe_timeout_s``
    before the patience runs out, so a hop that stopped (crashed, SIGSTOP, cut link) is blamed after the
    patience exactly, and a hop still working (a step in flight or steps served since the last probe) earns
    another patience window. None: ``step_timeout_s``."""
    decode_timeout_factor: float = 20.0
    """How many times the recent median decode latency a step may take before its chain is probed."""
    probe_timeout_s: float = 1.0
    """A hop that does not answer Info within this is blamed (it cannot be working: Info needs no compute)."""
    unary_timeout_s: float = 5.0
    """Deadline of CloseSession/Truncate/Info calls made for their own sake."""
    prefill_chunk: int = 512
    """Prompt positions per step message; longer prompts are sent as several pipelined steps."""
    forward_codec: str = "none"
    """Codec peers use for hidden states: 'none' or 'lz4' (measure first: bench/bench_codec.py)."""


class _Deliver(pb_grpc.CoordinatorServicer):
    def __init__(self, client: PeerChainClient) -> None:
        self._client = client

    async def Deliver(self, request_iterator, context) -> pb.DeliverSummary:
        count = 0
        async for result in request_iterator:
            count += 1
            self._client._resolve(result)
        return pb.DeliverSummary(results=count)


class PeerChainClient(ClientPrivacy, ControlCalls, Liveness, RebuildClient):
    def __init__(
        self,
        route: Sequence[HopSpec],
        *,
        reply_host: str = "127.0.0.1",
        reply_port: int = 0,
        advertise_host: str | None = None,
        tunables: ClientTunables | None = None,
        privacy: ChainPrivacy | None = None,
        embedder: Embedder | None = None,
        key_lookup: KeyLookup | None = None,
        swarm_token: str | None = None,
        head: Head | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``loop``: a running event loop of another thread to do the client's gRPC work on (the node passes its peer
        server's loop); None: the client runs a loop on a thread of its own. See :attr:`shares_loop`."""
        self.tunables = tunables or ClientTunables()
        self.swarm_token = swarm_token  # private swarm credential on every call (peer/swarm_auth.py)
        self.head = head  # final norm + LM head: sample on the coordinator under onion (peer/head.py)
        self._decode_latencies: collections.deque[float] = collections.deque(maxlen=32)
        self._probe_latencies: collections.deque[float] = collections.deque(maxlen=16)
        self.privacy = privacy or ChainPrivacy()
        self.embedder = embedder
        self.key_lookup = key_lookup
        self.crypto_rejections: Counter[str] = Counter()
        self.dp_audits = 0  # DP audit records verified (privacy=onion_dp)
        self.onion_receipts: dict[str, list] = {}  # privacy=onion: hops' own receipts from the close (onion_control)
        # closed sessions' per-hop settlement keys, until the settler takes them (client_control.py)
        self.settlement_keys: collections.OrderedDict[str, SettlementKeys] = collections.OrderedDict()
        self._crypto: dict[str, CoordinatorRoute] = {}  # session -> its encrypted route
        self._codec = codec_from_name(self.tunables.forward_codec)
        self.route = tuple(route)
        self._pending: dict[tuple[str, int], asyncio.Future] = {}
        self._rebuilding: set[tuple[str, int]] = set()  # rebuild messages: answered with token -1 by a relay
        self.local_addresses: set[str] = set()
        self._last_info: dict[str, pb.InfoReply] = {}  # each hop's last probe answer
        """Peers served by this very process (the node's own span). A liveness probe they answer late means this
        process is overloaded, not that they stopped: never blamed by a probe (a step they fail still is)."""
        self._seq = itertools.count()
        self._streams: dict[tuple[str, str], OutboundStream | LocalStream] = {}
        self._local_peers: dict[str, Any] = {}  # address -> PeerService of this process on this loop (serve_locally)
        self._thread: threading.Thread | None = None  # None: the loop is someone else's (``loop``)
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="peer-client", daemon=True)
            self._thread.start()
        self._loop = loop
        self._pool: ChannelPool = self._call(self._make_pool())
        self._server: grpc.aio.Server = self._call(self._start_server(reply_host, reply_port))
        if advertise_host:  # peers reach the reply server at another address (NAT, a relay, a container)
            self._reply_address = f"{advertise_host}:{self._reply_address.rsplit(':', 1)[1]}"

    # ---- public, thread-safe --------------------------------------------------------------------

    @property
    def route(self) -> tuple[HopSpec, ...]:
        return self._route

    @route.setter
    def route(self, route: Sequence[HopSpec]) -> None:
        """Replace the default chain; spans must tile from layer 0 in order (empty: routes come per step)."""
        self._route = self._checked(route) if route else ()

    @staticmethod
    def _checked(route: Sequence[HopSpec]) -> tuple[HopSpec, ...]:
        route = tuple(route)
        if not route or route[0].start != 0:
            raise ValueError("a route must start at layer 0")
        for prev, nxt in itertools.pairwise(route):
            if prev.end != nxt.start:
                raise ValueError(f"route is not contiguous: [{prev.start},{prev.end}) then [{nxt.start},{nxt.end})")
        return route

    def step(self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int) -> int:
        """The router's ``Pipeline.step``: feed tokens at ``start_pos...``, return the sampled token."""
        return self.step_result(session_id, token_ids, start_pos, sampling, step).token

    def step_result(
        self,
        session_id: str,
        token_ids: list[int],
        start_pos: int,
        sampling: SamplingParams,
        step: int,
        *,
        return_logits: bool = False,
        return_top_k: int = 0,
        all_logits: bool = False,
        one_pass_verify: bool = False,
        route: Sequence[HopSpec] | None = None,
        prefix: PrefixKey | None = None,
    ) -> StepResult:
        """One step; ``route`` overrides the client's default chain for this step (per-session routes).

        ``prefix``: a new session's prompt block hashes (runtime/prefix_cache.py), sent with its first message.
        ``one_pass_verify``: a verify (``all_logits`` over drafts) runs as one forward on each hop instead of
        position by position as plain decoding (peer.proto Sampling.one_pass_verify).
        """
        if not token_ids:
            raise ValueError("a step needs at least one token")
        extras = {"return_logits": return_logits, "return_top_k": return_top_k, "all_logits": all_logits,
                  "one_pass_verify": one_pass_verify}
        chain = self._route if route is None else self._checked(route)
        coro = self._step(session_id, list(token_ids), start_pos, sampling, step, extras, chain, prefix)
        messages = -(-len(token_ids) // self.tunables.prefill_chunk)
        # a prompt's prefill stops being awaited once its client went away (router/abandon.py); decode steps wait
        result = self._call(coro, timeout=self._wait_budget(messages), abandonable=len(token_ids) > 1)
        if result.hidden is not None:  # onion: norm, head and sampling here, on the caller's thread (see _step)
            result = self._sample_here(result, sampling, step, extras)
        return result

    def replay(self, session_id: str, feeds: Sequence[tuple[list[int], int, SamplingParams, int]],
               route: Sequence[HopSpec]) -> list[StepResult]:
        """Re-run ``(tokens, start, sampling, step)`` feeds in order on ``route``, pipelined (failover replay)."""
        chain = self._checked(route)
        messages = sum(-(-len(f[0]) // self.tunables.prefill_chunk) for f in feeds)
        results = self._call(self._replay(session_id, [(list(f[0]), *f[1:]) for f in feeds], chain),
                             timeout=self._wait_budget(messages))
        # onion: norm, head and sampling here, on the caller's thread (as step_result), not on the event loop
        return [self._sample_here(r, f[2], f[3], {}) if r.hidden is not None else r
                for r, f in zip(results, feeds, strict=True)]

    def _wait_budget(self, messages: int) -> float:
        """A backstop only: the event-loop side always settles within its own bounds first."""
        return (MAX_WAIT_STEPS + 1) * self.tunables.step_timeout_s * messages + self.tunables.unary_timeout_s * 4

    def shutdown(self) -> None:
        async def stop() -> None:
            for stream in list(self._streams.values()):
                await stream.close()
            await self._server.stop(0.2)
            await self._pool.close()

        self._call(stop())
        if self._thread is not None:  # a shared loop goes on serving its owner
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    @property
    def reply_address(self) -> str:
        return self._reply_address

    # ---- event-loop side ------------------------------------------------------------------------

    @property
    def shares_loop(self) -> bool:
        """Whether the client works on a loop it was given. One loop for all of a process's gRPC saves a thread wake-up
        per event: gRPC's poller wakes every loop that uses gRPC in the process, and the loop that takes the wake-up
        hands other loops' events over with ``call_soon_threadsafe`` (docs/benchmarks.md, "One event loop")."""
        return self._thread is None

    def _call(self, coro, timeout: float | None = 30.0, *, abandonable: bool = False) -> Any:
        if _running_loop() is self._loop:  # blocking here would wait for this very thread forever
            coro.close()
            raise RuntimeError("PeerChainClient's blocking calls cannot run on the event loop it works on")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return abandon.wait(future, timeout) if abandonable else future.result(timeout=timeout)

    async def _make_pool(self) -> ChannelPool:
        return ChannelPool(self.swarm_token)

    async def _start_server(self, host: str, port: int) -> grpc.aio.Server:
        interceptors = []
        if self.swarm_token is not None:  # results come only from the swarm's own peers
            from openhydra.peer.swarm_auth import SwarmAuthInterceptor

            interceptors.append(SwarmAuthInterceptor(self.swarm_token))
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the reply address {host}:{port}")
        pb_grpc.add_CoordinatorServicer_to_server(releasing(_Deliver(self)), server)
        await server.start()
        self._reply_address = f"{host}:{bound}"
        return server

    async def _step(
        self,
        session_id: str,
        tokens: list[int],
        start: int,
        sampling: SamplingParams,
        step: int,
        extras: dict,
        route: tuple[HopSpec, ...],
        prefix: PrefixKey | None = None,
    ) -> StepResult:
        if not route:
            raise ValueError("no route: set PeerChainClient.route or pass route= per step")
        began = time.monotonic()
        futures = await self._send(session_id, tokens, start, sampling, step, extras, route, prefix)
        results = await self._gather(session_id, futures, route)
        if len(tokens) == 1:
            self._decode_latencies.append(time.monotonic() - began)
        # Under onion the last hop returns hidden states; step_result applies the head on the thread that waits
        # for this step anyway. Handing the head to an executor here cost two more thread wake-ups per token on
        # the critical path (loop -> pool thread -> loop -> caller), which a privacy=off token does not pay.
        return results[-1]

    async def _replay(self, session_id: str, feeds: Sequence[tuple[list[int], int, SamplingParams, int]],
                      route: tuple[HopSpec, ...]) -> list[StepResult]:
        """Re-run a session's steps on a new chain, pipelined: every step is sent before the first result is
        awaited, so a replay of n steps costs about n x the slowest hop's compute plus one pass of the chain,
        not n round trips. Each step keeps its own chunking, positions and sampling step, so the caches it
        builds are the ones the first run built."""
        if not route:
            raise ValueError("no route to replay on")
        futures: list[tuple[int, asyncio.Future]] = []
        ends: list[int] = []
        for tokens, start, sampling, step in feeds:
            futures += await self._send(session_id, tokens, start, sampling, step, {}, route, None,
                                        queued=len(futures))
            ends.append(len(futures) - 1)
        results = await self._gather(session_id, futures, route)
        return [results[i] for i in ends]  # under onion still hidden states: replay() samples on its caller's thread

    async def _send(
        self,
        session_id: str,
        tokens: list[int],
        start: int,
        sampling: SamplingParams,
        step: int,
        extras: dict,
        route: tuple[HopSpec, ...],
        prefix: PrefixKey | None,
        queued: int = 0,
        control: dict[str, Any] | None = None,
        with_input: bool = True,
    ) -> list[tuple[int, asyncio.Future]]:
        """Send one step's messages (one per prefill chunk) to the first hop; a future per message.

        Message i's deadline (``queued`` messages already ahead of it) is work-scaled: the longest the coordinator
        could wait for it (``MAX_WAIT_STEPS`` x ``step_timeout_s`` per message up to it). Peers drop steps that
        arrive later, which only clears out abandoned work: liveness is judged by progress, not by deadlines."""
        crypto = self._crypto_route(session_id, route) if self.privacy.encrypt else None
        futures: list[tuple[int, asyncio.Future]] = []
        chunk = self.tunables.prefill_chunk
        try:
            for offset in range(0, len(tokens), chunk):
                piece = tokens[offset : offset + chunk]
                seq = next(self._seq)
                ahead = queued + len(futures) + 1  # abandoned by then for sure: the coordinator waits no longer
                deadline_ms = int((time.time() + MAX_WAIT_STEPS * self.tunables.step_timeout_s * ahead) * 1000)
                message = pb.Step(
                    session_id=session_id,
                    seq=seq,
                    start_position=start + offset,
                    num_positions=len(piece),
                    # ids [S], or embeddings [S, D]; none for a rebuild that starts past layer 0 (peer/rebuild.py)
                    tensor=self._input_tensor(piece, crypto is not None) if with_input else pb.Tensor(),
                    route=[] if self.privacy.onion else [pb.Hop(address=h.address, start=h.start, end=h.end)
                                                         for h in route],
                    sampling=pb.Sampling(
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k,
                        seed=sampling.seed,
                        sampling_step=step,
                        **extras,
                        return_hidden=self._samples_here,
                    ),
                    reply_to="" if self.privacy.onion else self._reply_address,
                    deadline_unix_ms=deadline_ms,
                    forward_codec=self._codec,
                )
                if crypto is not None and self.privacy.dp:  # each hop noises its output (audited in _resolve)
                    message.dp_sigma, message.dp_clip = self.privacy.dp_sigma, self.privacy.dp_clip
                if prefix is not None and offset == 0:  # the prompt's block hashes (runtime/prefix_cache.py)
                    message.prefix_hashes.extend(prefix.hashes)
                    message.prefix_block = prefix.block
                if control:  # failover rebuild: adopt fields with the first message only (peer/rebuild.py)
                    message.rebuild_start, message.rebuild_end = control["rebuild_start"], control["rebuild_end"]
                    if "adopt_session" in control and offset == 0:
                        message.adopt_session, message.adopt_length = control["adopt_session"], control["adopt_length"]
                        message.adopt_tags.extend(control["adopt_tags"])
                    self._rebuilding.add((session_id, seq))
                if crypto is not None:
                    message = crypto.seal_step(message)
                future = self._loop.create_future()
                self._pending[(session_id, seq)] = future
                futures.append((seq, future))
                try:
                    await self._stream(session_id, route[0].address).send(message, context=session_id)
                except StreamBroken as exc:
                    self._fail_session(session_id, HopError(route[0].address, exc.code, exc.details))
                    break
        except asyncio.CancelledError:  # the step was abandoned while its chunks went out (router/abandon.py)
            for seq, future in futures:
                self._pending.pop((session_id, seq), None)
                future.cancel()
            raise
        return futures

    async def _gather(self, session_id: str, futures: list[tuple[int, asyncio.Future]],
                      route: Sequence[HopSpec]) -> list[StepResult]:
        """Each message's result in order, waiting as long as the chain makes progress (see ClientTunables)."""
        try:
            return [await self._await_progress(future, route) for _seq, future in futures]
        finally:
            for seq, future in futures:
                self._pending.pop((session_id, seq), None)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # settled after an earlier message failed: nobody else will look

    def _resolve(self, result: pb.Result) -> None:
        future = self._pending.get((result.session_id, result.seq))
        if future is None or future.done():
            return  # late or duplicate report for a step already settled
        crypto = self._crypto.get(result.session_id)
        if crypto is not None and not self._authentic(crypto, result):
            return  # anyone can reach the reply address: a forgery blames no hop (a real failure is found by probes)
        self._pending.pop((result.session_id, result.seq), None)
        rebuild = (result.session_id, result.seq) in self._rebuilding
        if crypto is not None and result.control_replies:  # onion control: the sender opens the replies
            future.set_result(result)
            return
        if crypto is not None and result.WhichOneof("outcome") != "failure":
            last = crypto.route[-1].address
            try:
                if self.privacy.dp and result.WhichOneof("outcome") != "failure" and not rebuild:
                    self._audit_dp(crypto, result)  # a rebuild re-pushes recorded activations: nothing to audit
            except CryptoError as exc:
                self.crypto_rejections[exc.reason] += 1
                index = getattr(exc, "hop_index", None)
                blamed = crypto.route[index].address if index is not None and index < len(crypto.route) else last
                future.set_exception(HopError(blamed, grpc.StatusCode.DATA_LOSS,
                                              f"result rejected: {exc.reason}: {exc}"))
                return
        if result.WhichOneof("outcome") == "failure":
            f = result.failure
            expected = f.expected_position if f.expected_position >= 0 else None
            future.set_exception(HopError(f.hop_address, status_code(f.code), f.message, expected))
            return
        logits = decode_tensor(result.logits, max_bytes=MAX_MESSAGE_BYTES) if result.HasField("logits") else None
        hidden = None
        if self._samples_here and not (rebuild and result.token == -1):
            if not result.HasField("hidden"):
                future.set_exception(HopError(result.last_hop, grpc.StatusCode.DATA_LOSS,
                                              "the last hop sampled instead of returning hidden states"))
                return
            hidden = decode_tensor(result.hidden, max_bytes=MAX_MESSAGE_BYTES)
        future.set_result(
            StepResult(
                token=result.token,
                last_hop=result.last_hop,
                logits=logits,
                top_ids=tuple(result.top_ids),
                top_logprobs=tuple(result.top_logprobs),
                token_logprob=result.token_logprob if result.HasField("token_logprob") else None,
                hidden=hidden,
            )
        )

    def _fail_session(self, session_id: str, error: HopError) -> None:
        for (sid, _seq), future in list(self._pending.items()):
            if sid == session_id and not future.done():
                future.set_exception(error)

    async def _on_broken(self, address: str, code: grpc.StatusCode, details: str, session_id: Any) -> None:
        if not isinstance(session_id, str):
            return
        relayed = parse_hop_failure(details)
        crypto = self._crypto.get(session_id)
        if relayed is not None:  # a hop up the chain reported a failure (by route index)
            index, code_value, expected, message = relayed
            if crypto is not None and 0 <= index < len(crypto.route):
                address = crypto.route[index].address
            code, details = status_code(code_value), message
            error = HopError(address, code, details, expected if expected >= 0 else None)
        else:
            error = HopError(address, code, details or "stream to the first hop broke")
        self._fail_session(session_id, error)

    def _stream(self, session_id: str, address: str) -> OutboundStream | LocalStream:
        key = (session_id, address)
        stream = self._streams.get(key)
        if stream is None:
            local = self._local_peers.get(address)
            if local is not None:  # this process's own span, on this loop: no gRPC in between (peer/local_stream.py)
                stream = LocalStream(local, address, self._on_broken)
            else:
                stream = OutboundStream(self._pool, address,
                                        lambda ch: pb_grpc.PeerStub(ch).Forward(timeout=STREAM_LIFETIME_S),
                                        self._on_broken)
            self._streams[key] = stream
        return stream

    def serve_locally(self, address: str, service: Any) -> None:
        """Steps to ``address`` go straight to ``service`` (the ``PeerService`` this process serves there), which must
        work on the client's own loop; see peer/local_stream.py. Its unary calls (Info, close, truncate) stay gRPC."""
        if not self.shares_loop:
            raise ValueError("a local peer needs the client on the peer server's loop (PeerChainClient(loop=...))")
        self._local_peers[address] = service
        self.local_addresses.add(address)

